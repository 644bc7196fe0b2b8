"""Shared fixtures. Model-sized work lives behind `default_assets` (built once into the real
cache, as `raymed assets` would; a second call is a cheap check) and is marked slow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raymed.assets import build_assets, default_cache_dir

# Ray Train's controller polls its workers every 2 s and watches for node preemption
# (which a one-node test cluster never sees), costing seconds at every start, finish and
# failure. Set in this process's environment, so every Ray these tests start (the fixture's,
# a subprocess driver's, `ray start --head`) inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def default_assets() -> Path:
    """RAYMED_CACHE with every default asset built (idempotent)."""
    build_assets()
    return default_cache_dir()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (4 logical CPUs on 2 cores, so
    two Train workers plus Ray Data actors fit)."""
    import ray

    # Workers import this checkout's raymed (not whichever one is installed) and test
    # modules (Train loops defined in tests) from tests/.
    tests_dir = Path(__file__).resolve().parent
    python_path = f"{tests_dir.parent}:{tests_dir}"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": python_path}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def smollm2_tokenizer(default_assets):
    """The default model's tokenizer (and chat template), loaded once."""
    from transformers import AutoTokenizer

    from raymed.assets import resolve_pretrained

    return AutoTokenizer.from_pretrained(resolve_pretrained("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_model(smollm2_tokenizer):
    """A factory: `tiny_model(seed)` is a fresh tiny Llama (random weights, the default
    tokenizer's vocabulary); `tiny_model.save(model, directory)` writes it as a Hugging
    Face directory (safetensors + tokenizer), as a training checkpoint would."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    def build(seed: int = 0):
        torch.manual_seed(seed)
        config = AutoConfig.for_model(
            "llama", vocab_size=-(-len(smollm2_tokenizer) // 64) * 64, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            architectures=["LlamaForCausalLM"])
        return AutoModelForCausalLM.from_config(config).eval()

    def save(model, directory: Path) -> Path:
        model.save_pretrained(directory)
        smollm2_tokenizer.save_pretrained(directory)
        return directory

    build.save = save
    build.tokenizer = smollm2_tokenizer
    return build
