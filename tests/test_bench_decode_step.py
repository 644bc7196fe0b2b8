"""bench/decode_step.py's memory-bandwidth bound: the bytes it says a decode step reads,
checked against a real tiny model and the cache a real prefill fills."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from raymed.serve.slots import cache_argument

path = Path(__file__).resolve().parent.parent / "bench" / "decode_step.py"
spec = importlib.util.spec_from_file_location("decode_step", path)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def tiny(tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_the_weights_read_are_every_tensor_once_but_an_untied_input_embedding(tied):
    model = tiny(tied)
    everything = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = 256 * 32 * 4  # float32
    assert bench.weight_bytes(model) == (everything if tied else everything - embedding)


def test_the_key_and_value_bytes_per_token_are_what_a_prefill_stores():
    model = tiny(tied=True)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.arange(10)[None], use_cache=True, **{cache_argument(model): cache})
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert bench.kv_bytes_per_token(model) == stored / 10


def test_the_copy_bandwidth_is_a_plausible_figure():
    assert 1e8 < bench.copy_bandwidth(torch.device("cpu")) < 1e13  # 0.1 GB/s to 10 TB/s
