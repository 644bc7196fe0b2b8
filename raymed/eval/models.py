"""Model directories for evaluation: found, checked (safetensors only, a tokenizer, a
causal LM), loaded, and identified by the files that were scored."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from raymed.errors import RaymedError

WEIGHT_SUFFIXES = (".safetensors",)
UNSAFE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model")


def resolve_model_dir(path: str | Path) -> Path:
    """A Hugging Face model directory with safetensors weights and a tokenizer: the path
    itself (a training checkpoint is one) or its `model/` subdirectory."""
    given = Path(path).expanduser()
    if not given.is_dir():
        raise RaymedError(f"{path} is not a directory: give a Hugging Face model directory or a training checkpoint")
    directory = given / "model" if not (given / "config.json").is_file() and (given / "model" / "config.json").is_file() else given
    if not (directory / "config.json").is_file():
        raise RaymedError(f"{path} is not a model directory (no config.json): give a Hugging Face model "
                          "directory or a training checkpoint")
    names = [p.name for p in directory.iterdir() if p.is_file()]
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        unsafe = sorted(n for n in names if n.endswith(UNSAFE_WEIGHTS) and n not in ("optimizer.pt", "scheduler.pt"))
        why = f"only {', '.join(unsafe)}, and only safetensors weights are loaded" if unsafe else "no *.safetensors weights"
        raise RaymedError(f"{path} is not a loadable model: {why}")
    if not any(n in ("tokenizer.json", "tokenizer_config.json") for n in names):
        raise RaymedError(f"{path} has no tokenizer (tokenizer.json / tokenizer_config.json): save it with the model")
    try:
        architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as err:
        raise RaymedError(f"{directory / 'config.json'} is not valid JSON: {err}") from None
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise RaymedError(f"{path} is a {', '.join(architectures)}, not a causal language model")
    return directory


def find_checkpoints(path: str | Path) -> list[Path]:
    """The model directories under `path`: itself when it is one, else every Ray Train
    checkpoint (`checkpoint_*`) below it, e.g. a run's `train/` directory."""
    given = Path(path).expanduser()
    if given.is_dir() and not (given / "config.json").is_file() and not (given / "model").is_dir():
        found = sorted(p for p in given.rglob("checkpoint_*") if p.is_dir() and (p / "config.json").is_file())
        if found:
            return [resolve_model_dir(p) for p in found]
    return [resolve_model_dir(given)]


def load_model(model_dir: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a model directory: safetensors only, no remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True,
                                                     trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise RaymedError(f"{model_dir} is not a causal LM that transformers can load: {err}") from None
    return model.to(device).eval(), tokenizer


def tokenizer_digest(model_dir: Path) -> str:
    """Identifies a tokenizer by its files, so models sharing one share validation blocks."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            digest.update(name.encode() + b"\0" + (model_dir / name).read_bytes())
    return digest.hexdigest()


def model_digest(model_dir: Path) -> str:
    """Identifies what a model's scores depend on: the SHA-256 of each file a registry
    version would keep (weights, config, tokenizer, chat template), names included."""
    from raymed.registry import file_sha256, model_files

    digest = hashlib.sha256()
    for path in model_files(model_dir):
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()
