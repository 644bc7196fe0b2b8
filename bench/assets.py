"""Benchmark the asset cache: cold build, warm (idempotent) rerun, and loading the default
model from the converted safetensors against loading it from the packaged GGUF (baseline).

    python bench/assets.py            # prints one JSON object
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from raymed.assets import build_assets
from raymed.assets.models import DEFAULT_MODEL, load_smollm2_gguf


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, round(time.perf_counter() - start, 2)


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        cold = {}
        for name in ("model", "gpt2-tokenizer", "corpus"):
            _, cold[name] = _timed(lambda name=name: build_assets(cache, (name,)))
        _, warm = _timed(lambda: build_assets(cache))
        _, gguf_load = _timed(load_smollm2_gguf)
        model_dir = cache / "models" / DEFAULT_MODEL
        _, converted_load = _timed(
            lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        )
    return {
        "benchmark": "assets",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "cold_build_s": cold,
        "warm_rerun_s": warm,
        "model_load_s": {"gguf_baseline": gguf_load, "converted_safetensors": converted_load},
        "model_load_speedup": round(gguf_load / converted_load, 1),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
