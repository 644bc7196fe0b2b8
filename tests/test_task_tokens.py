"""Task tokens (`model.add_tokens`): config checks, embedding rows that start at the mean and
train in every scope, and checkpoints that load with the tokens in place."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from raymed.config import ModelConfig, TrainConfig, load_config
from raymed.errors import RaymedError
from raymed.tokenizer.task_tokens import load_run_tokenizer, optimizer_groups, task_token_ids
from raymed.tokenizer.train import train_bpe
from raymed.train import apply_scope, build_model, check_model_fits, load_checkpoint_model, save_checkpoint_model

TASK_TOKENS = ["<dx>", {"content": "<|tool|>", "special": True}]
SAMPLE = "fever and cough <dx> pneumonia <|tool|> chest x-ray"
SCOPES = {"full": {}, "top_layers": {"top_layers": 1}, "lora": {"lora_r": 4}}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A 300-id byte-level BPE tokenizer (seconds to train, no Ray)."""
    directory = tmp_path_factory.mktemp("tokenizer")
    texts = ["the patient has a fever and a cough", "chest pain with shortness of breath"] * 50
    train_bpe(iter(texts), vocab_size=300).save_pretrained(directory)
    return directory


def _pretrained(tokenizer_dir, directory, tied: bool):
    """A tiny Llama with `tokenizer_dir`'s vocabulary, saved as a Hugging Face directory."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                  tie_word_embeddings=tied, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _model_config(model_dir) -> ModelConfig:
    return ModelConfig(name=str(model_dir), add_tokens=TASK_TOKENS)


@pytest.mark.parametrize(("tokens", "message"), [
    (["<dx>", "<dx>"], r"model\.add_tokens: '<dx>' is given twice"),
    ([""], r"model\.add_tokens\.0: a task token must have visible text"),
    (["<dx>", {"content": "  ", "special": True}], r"model\.add_tokens\.1: a task token must have visible text"),
])
def test_blank_or_repeated_tokens_are_config_errors_naming_the_field(tokens, message):
    with pytest.raises(RaymedError, match=message):
        load_config(None, [f"model.add_tokens={tokens}"])


def test_a_token_the_tokenizer_already_has_is_an_error_naming_it(tokenizer_dir):
    config = ModelConfig(name=str(tokenizer_dir), add_tokens=["<dx>", "<|im_end|>"])
    with pytest.raises(RaymedError, match=r"model\.add_tokens: '<\|im_end\|>' is already in the tokenizer .* \(id 2\)"):
        load_run_tokenizer(config)


def test_added_tokens_are_whole_ids_and_a_special_one_is_skipped_when_decoding(tokenizer_dir):
    tokenizer = load_run_tokenizer(_model_config(tokenizer_dir))
    dx, tool = task_token_ids(tokenizer, _model_config(tokenizer_dir).add_tokens)
    assert (dx, tool) == (300, 301)  # after the tokenizer's own, in the order given
    ids = tokenizer(SAMPLE)["input_ids"]
    assert dx in ids and tool in ids
    assert tokenizer.decode(ids) == SAMPLE
    assert tokenizer.decode(ids, skip_special_tokens=True) == SAMPLE.replace("<|tool|>", "")


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_start_at_the_mean_and_a_tied_head_stays_tied(tokenizer_dir, tmp_path, tied):
    model_dir = _pretrained(tokenizer_dir, tmp_path, tied)
    config = _model_config(model_dir)
    tokenizer = load_run_tokenizer(config)
    model = build_model(config, tokenizer)
    embedding = model.get_input_embeddings().weight
    assert embedding.shape[0] == len(tokenizer) == 302
    assert (model.lm_head.weight is embedding) == tied
    for weight in {id(w): w for w in (embedding, model.lm_head.weight)}.values():
        torch.testing.assert_close(weight[300:], weight[:300].mean(0).expand(2, -1))
    check_model_fits(load_config(None, [f"model.name={model_dir}", f"model.add_tokens={TASK_TOKENS}",
                                        "data.block_size=64"]))  # the model grows to fit: no error


def _train_one_step(model, tokenizer):
    """Parameters before one AdamW step (with weight decay) on a sample holding the new tokens."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(optimizer_groups(params, weight_decay=0.1), lr=0.1)
    ids = torch.tensor([tokenizer(SAMPLE)["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return before


def _embedding(model):
    """The input embedding's weight as a plain model has it (LoRA merged into a copy)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = copy.deepcopy(model).merge_and_unload()
    return model.get_input_embeddings().weight.detach()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("scope", list(SCOPES))
def test_new_rows_train_in_every_scope_and_load_with_from_pretrained(tokenizer_dir, tmp_path, scope, tied):
    model_dir = _pretrained(tokenizer_dir, tmp_path / "base", tied)
    config = _model_config(model_dir)
    tokenizer = load_run_tokenizer(config)
    new_ids = task_token_ids(tokenizer, config.add_tokens)
    start = _embedding(build_model(config, tokenizer))
    model = apply_scope(build_model(config, tokenizer), TrainConfig(scope=scope, **SCOPES[scope]), new_ids)
    _train_one_step(model, tokenizer)
    trained = _embedding(model)
    moved = (trained != start).any(dim=1)
    assert moved[new_ids].all(), "the new rows did not train"
    if scope != "full":  # the tokenizer's own rows stay as they were, weight decay or not
        assert not moved[:300].any()

    save_checkpoint_model(model, tokenizer, tmp_path / "checkpoint")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "checkpoint")
    assert loaded_tokenizer(SAMPLE)["input_ids"] == tokenizer(SAMPLE)["input_ids"]
    assert loaded_tokenizer.decode(tokenizer(SAMPLE)["input_ids"], skip_special_tokens=True) == \
        SAMPLE.replace("<|tool|>", "")
    torch.testing.assert_close(loaded.get_input_embeddings().weight, trained)
    assert (loaded.lm_head.weight is loaded.get_input_embeddings().weight) == tied

    resumed = apply_scope(build_model(config, tokenizer), TrainConfig(scope=scope, **SCOPES[scope]), new_ids)
    load_checkpoint_model(resumed, tmp_path / "checkpoint")  # a restart resumes strictly
    torch.testing.assert_close(_embedding(resumed), trained)
