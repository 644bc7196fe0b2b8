"""Which model a deployment serves, and loading it on a replica.

`served_model` is the one seam between serving and where models come from: the model
registry's `current` version (`serve.model: current`, the default; the base model is
registered as v1 on first use), a cached model name, or a Hugging Face directory. It is
resolved once, at deploy time, and the directory is pinned for every replica (autoscaled
ones too) until the next deploy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from raymed.assets import resolve_pretrained
from raymed.config import Config, ServeConfig
from raymed.errors import RaymedError


@dataclass(frozen=True)
class ServedModel:
    """What a deployment pins at deploy time: the directory, the name clients use, the context."""

    directory: str
    name: str
    context_length: int
    version: str | None = None
    """The registry version pinned (None when serving a directory directly)."""

    def fingerprint(self) -> str:
        """What answers report as `system_fingerprint`: the name and the pinned version (or directory)."""
        return f"{self.name}:{self.version or Path(self.directory).name}"

REGISTRY_MODEL = "current"


def resolve_model_dir(serve: ServeConfig) -> Path:
    """The Hugging Face model directory `serve.model` names (a clear error if it is not one)."""
    path = Path(resolve_pretrained(serve.model)).expanduser()
    if not (path / "config.json").is_file():
        raise RaymedError(
            f"serve.model {serve.model!r} is not a Hugging Face model directory (no config.json at {path}): "
            "give a cached model name (smollm2-135m-instruct) or a directory saved with save_pretrained"
        )
    return path.resolve()


def served_model(config: Config) -> ServedModel:
    """What this deploy serves, resolved now and pinned."""
    serve = config.serve
    if serve.model == REGISTRY_MODEL:
        from raymed.promote import resolve_current

        directory = resolve_current(config)
        return ServedModel(str(directory), serve.model_name or config.registry.name,
                           context_length(directory), version=directory.name)
    directory = resolve_model_dir(serve)
    return ServedModel(str(directory), serve.model_name or directory.name, context_length(directory))


def context_length(directory: Path) -> int:
    config = json.loads((directory / "config.json").read_text())
    config = config.get("text_config", config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(config.get(key), int):
            return config[key]
    raise RaymedError(f"{directory}/config.json names no context length (max_position_embeddings)")


SAMPLING_FIELDS = ("temperature", "top_p", "repetition_penalty")


def sampling_defaults(directory: Path, serve: ServeConfig) -> dict[str, float]:
    """What a request that omits temperature, top_p or repetition_penalty gets: the model's
    generation_config.json value (vLLM's `--generation-config auto`), else `serve.default_*`."""
    path = directory / "generation_config.json"
    configured = json.loads(path.read_text()) if path.is_file() else {}
    return {name: float(configured[name]) if isinstance(configured.get(name), (int, float))
            else getattr(serve, f"default_{name}") for name in SAMPLING_FIELDS}


def vocab_size(directory: Path) -> int:
    config = json.loads((directory / "config.json").read_text())
    return int(config.get("text_config", config)["vocab_size"])


def load_for_inference(model_dir: str, serve: ServeConfig):
    """Model (eval mode, on the replica's GPU if it has one) and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    on_gpu = serve.num_gpus > 0 and torch.cuda.is_available()
    dtype = serving_dtype(serve.dtype, on_gpu)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa",
                                                     use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise RaymedError(f"cannot load the model in {model_dir}: {err}") from None
    return model.to("cuda" if on_gpu else "cpu").eval(), tokenizer


def serving_dtype(choice: str, on_gpu: bool):
    """The weights' dtype for `serve.dtype`. `auto`: bfloat16 on a GPU, and on a CPU that
    multiplies bfloat16 natively (AVX512-BF16 or AMX: there a decode step at batch 16 of the
    default model takes half the time of float32's); float32 on other CPUs."""
    import torch

    if choice != "auto":
        return getattr(torch, choice)
    return torch.bfloat16 if on_gpu or cpu_has_native_bfloat16() else torch.float32


def cpu_has_native_bfloat16() -> bool:
    import torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every token that ends a generation: the generation config's and the tokenizer's."""
    ids = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update([configured] if isinstance(configured, int) else configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
