"""Untrusted files never execute code: a pickle planted where weights or optimizer state
are expected is refused (the marker file its payload would write stays absent), and the
project's code never loads pickles or remote code."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from raymed.config import ModelConfig
from raymed.errors import RaymedError

ROOT = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this runs `open(marker, "w")`: the proof that a pickle executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        pickle.dump({"state": _Payload(marker)}, out)


def test_pickled_weights_in_a_model_directory_are_never_loaded(tmp_path):
    from raymed.train import build_model

    marker = tmp_path / "pwned"
    model_dir = tmp_path / "model"
    _plant(model_dir / "pytorch_model.bin", marker)
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}))
    with pytest.raises(RaymedError, match="is not a causal LM"):
        build_model(ModelConfig(name=str(model_dir), init="pretrained"), tokenizer=None)
    assert not marker.exists()


def test_pickled_optimizer_state_in_a_checkpoint_is_refused(tmp_path):
    from raymed.train.checkpoint import load_tensors

    marker = tmp_path / "pwned"
    _plant(tmp_path / "optimizer.pt", marker)
    with pytest.raises(RaymedError, match="optimizer.pt is unreadable"):
        load_tensors(tmp_path / "optimizer.pt")
    assert not marker.exists()
    torch.save({"step": torch.tensor(3)}, tmp_path / "good.pt")  # tensors alone still load
    assert load_tensors(tmp_path / "good.pt")["step"].item() == 3


FORBIDDEN = {
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only=True)"),
    "pickle.load": re.compile(r"\bpickle\.loads?\("),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
}


def test_project_code_never_loads_pickles_or_remote_code():
    sources = [p for d in ("raymed", "jobs", "serve", "tune", "bench") for p in (ROOT / d).rglob("*.py")]
    assert len(sources) > 10
    offences = [f"{p.relative_to(ROOT)}:{n}: {what}"
                for p in sources for n, line in enumerate(p.read_text().splitlines(), 1)
                for what, pattern in FORBIDDEN.items() if pattern.search(line)]
    assert offences == []
