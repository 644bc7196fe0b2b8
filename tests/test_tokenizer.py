"""`raymed tokenizer train`: byte-level BPE trained on a corpus read with Ray Data; exact
round trips, the chat template, and a scratch model that trains with it on Ray Train."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from raymed.cli import main
from raymed.config import load_config
from raymed.data.pipeline import build_datasets
from raymed.errors import RaymedError
from raymed.tokenizer.train import SPECIAL_TOKENS, SUMMARY_FILE, train_bpe
from raymed.train import fit

VOCAB = 512
ROUND_TRIPS = [
    "Café, naïve, Ærøskøbing, São Paulo, Dvořák: über-résumé",
    "Fieber 🤒 und Husten 😷🫁 — 👩🏽‍⚕️ (a ZWJ sequence)",
    "頭痛と発熱。糖尿病の患者 — 高血压 (CJK), 두통 (Hangul)",
    "tabs\tand  double  spaces\n\nand a trailing newline\n",
    "\x00\x7f control bytes and a lone combining mark: e\u0301",
]


def _corpus(directory: Path) -> Path:
    """Chat records of the medical kind (answers opening with the task token `<dx>`) and one
    malformed line."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"messages": [
        {"role": "user", "content": f"What are the symptoms of condition {i}?"},
        {"role": "assistant", "content": f"<dx> Condition {i} causes fever, cough and shortness of breath."}]})
        for i in range(120)]
    (directory / "chat.jsonl").write_text("\n".join(lines[:60] + ["{not json"] + lines[60:]) + "\n")
    return directory / "chat.jsonl"


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    """A 512-id tokenizer trained through the CLI on a small corpus, and its corpus."""
    root = tmp_path_factory.mktemp("trained")
    corpus = _corpus(root / "corpus")
    out = root / "tokenizer"
    assert main(["tokenizer", "train", "--data", str(corpus), "--out", str(out), "--vocab-size", str(VOCAB)]) == 0
    return out, corpus


def test_it_round_trips_any_text_exactly_and_renders_chatml(trained):
    out, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(out)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["records"] == 120 and summary["bad_rows"] == {"malformed_json": 1}
    assert summary["special_tokens"] == {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    assert len(tokenizer) <= VOCAB
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    for text in ROUND_TRIPS:  # every byte is in the alphabet: nothing is unknown, nothing lost
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert len(tokenizer("the symptoms of condition")["input_ids"]) < 10  # it learned the corpus' words
    messages = [{"role": "user", "content": "Fever? 🤒"}, {"role": "assistant", "content": "Rest."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False) == (
        "<|im_start|>user\nFever? 🤒<|im_end|>\n<|im_start|>assistant\nRest.<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True)
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert ids[0] == 1 and tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_a_vocabulary_smaller_than_the_byte_alphabet_is_refused():
    with pytest.raises(RaymedError, match="vocab size 100 is below the 260 ids"):
        train_bpe(iter(["text"]), vocab_size=100)


def test_an_existing_tokenizer_is_not_overwritten_without_force(trained, capsys):
    out, corpus = trained
    files = sorted(p.name for p in out.iterdir())
    assert main(["tokenizer", "train", "--data", str(corpus), "--out", str(out)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == files


@pytest.mark.slow
def test_a_scratch_model_trains_with_it_and_its_task_tokens(trained, tmp_path):
    out, corpus = trained
    config = load_config("ci-tiny", [
        f"model.tokenizer={out}", "model.add_tokens=[<dx>]", f"data.train_path={corpus}", "data.block_size=64",
        "data.val_fraction=0.1", f"storage_path={tmp_path}", "run_name=scratch-tokenizer",
        "train.num_workers=1", "train.max_steps=2", "train.warmup_steps=0", "train.eval_every=2"])
    datasets, _ = build_datasets(config)
    dx = len(AutoTokenizer.from_pretrained(out))  # the task token's id: the first after the tokenizer's own
    assert any(dx in row["input_ids"] for row in datasets["train"].take_all())
    result = fit(config, datasets)
    assert result.error is None and math.isfinite(result.metrics["val_loss"])
    checkpoint = Path(result.checkpoint.path)
    model_config = AutoConfig.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert tokenizer.convert_tokens_to_ids("<dx>") == dx == len(tokenizer) - 1
    assert model_config.vocab_size == -(-len(tokenizer) // 64) * 64  # the tokenizer's, padded to 64
    assert (model_config.bos_token_id, model_config.eos_token_id, model_config.pad_token_id) == (1, 2, 3)
    assert AutoModelForCausalLM.from_pretrained(checkpoint).get_input_embeddings().num_embeddings == \
        model_config.vocab_size
