"""The default model converted from the packaged GGUF: exact, trainable, and competent."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raymed.assets import asset_path
from raymed.assets.models import DEFAULT_MODEL, load_smollm2_gguf
from raymed.mcq import option_logprobs, pick

pytestmark = pytest.mark.slow

PROMPTS = [
    "Hypertension is a chronic condition in which",
    "<|im_start|>user\nWhat does the abbreviation BP stand for?<|im_end|>\n<|im_start|>assistant\n",
    "Common side effects of ibuprofen include",
]


@pytest.fixture(scope="module")
def model_dir(default_assets):
    return asset_path(f"models/{DEFAULT_MODEL}", default_assets)


@pytest.fixture(scope="module")
def converted(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def test_converted_logits_match_the_gguf_model(converted):
    model, tokenizer = converted
    gguf_model, gguf_tokenizer = load_smollm2_gguf()
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert ids.tolist() == gguf_tokenizer(prompt, return_tensors="pt").input_ids.tolist()
        with torch.no_grad():
            diff = (model(ids).logits - gguf_model.eval()(ids).logits).abs().max().item()
        assert diff < 1e-3, f"{prompt!r}: max |logit diff| = {diff}"


def test_directory_is_a_plain_trainable_checkpoint(model_dir, converted, tmp_path):
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (model_dir / "model.safetensors").is_file()
    model, tokenizer = converted
    ids = tokenizer("Anemia is a low red blood cell count.", return_tensors="pt").input_ids
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.embed_tokens.weight.grad is not None
    model.zero_grad()
    model.save_pretrained(tmp_path / "resaved")  # transformers refuses this for GGUF-quantized models
    assert (tmp_path / "resaved" / "model.safetensors").is_file()


def test_chat_template_round_trips(converted):
    _, tokenizer = converted
    _, gguf_tokenizer = load_smollm2_gguf()
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    messages = [
        {"role": "system", "content": "You are a careful medical assistant."},
        {"role": "user", "content": "What is tachycardia?"},
        {"role": "assistant", "content": "A resting heart rate above 100 beats per minute."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a careful medical assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is tachycardia?<|im_end|>\n"
        "<|im_start|>assistant\nA resting heart rate above 100 beats per minute.<|im_end|>\n"
    )
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 3
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_greedy_generation_stops_at_end_of_turn(converted):
    model, tokenizer = converted
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=40, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    assert tokenizer.eos_token_id in new  # a finished turn, not a cut-off


def test_abbreviation_multiple_choice_well_above_chance(converted, default_assets):
    model, tokenizer = converted
    items = [
        json.loads(line)
        for line in (default_assets / "eval/medical-mcq-v1.jsonl").read_text().splitlines()
    ]
    items = [i for i in items if i["source"] == "abbreviations"][:100]
    assert len(items) == 100
    normalised = total = 0
    for item in items:
        logprobs = option_logprobs(model, tokenizer, item["question"], item["options"])
        normalised += pick(item["options"], logprobs) == item["answer"]
        total += pick(item["options"], logprobs, length_norm=False) == item["answer"]
    # Chance is 25/100; P(X >= 45) under chance is below 1e-5. Measured (seed 0): 54 and 57.
    assert normalised >= 45, f"length-normalised: {normalised}/100 correct"
    assert total >= 45, f"total log-likelihood: {total}/100 correct"
