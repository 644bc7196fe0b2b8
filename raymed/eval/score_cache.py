"""Scores kept beside a registry version, so the gate scores each version once per registry.

A version's files never change, so what it scores on given items and validation blocks
never changes either. `scoring_key` names everything a score depends on: the model's file
checksums, the items' hash, the scoring option that changes picks (`eval.length_norm`) and,
for the validation metrics, the data config, the seed and the corpus files' checksums.
A cached entry is used only under the same key; anything else is scored again.

    registry/<name>/scores/<version>/<key>.json    {"key", "metrics", "picks"}

Each file is written to a temporary name and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from raymed.config import Config
from raymed.eval.items import items_digest
from raymed.eval.models import model_digest
from raymed.eval.report import ModelEval


def scoring_key(config: Config, model_dir: Path, items: list[dict], validation: bool,
                corpus_sha256: str | None) -> str:
    """What a model's scores depend on, hashed (validation: also the validation blocks' inputs)."""
    parts = {"model": model_digest(model_dir), "items": items_digest(items), "length_norm": config.eval.length_norm,
             "validation": {"data": config.data.model_dump(), "seed": config.seed, "corpus": corpus_sha256}
             if validation else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class ScoreCache:
    """One registry version's cached scores (a directory of `<key>.json` files)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def get(self, key: str, label: str, model_dir: Path, items: list[dict]) -> ModelEval | None:
        """The scores saved under `key`, labelled `label`; None when there are none (or the
        file cannot be read: then the model is simply scored again)."""
        try:
            entry = json.loads((self.directory / f"{key}.json").read_text())
            picks = np.array(entry["picks"], dtype=np.int64)
            metrics = entry["metrics"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if entry.get("key") != key or len(picks) != len(items):
            return None
        correct = picks == np.array([item["answer"] for item in items])
        return ModelEval(label, str(model_dir), metrics, picks, correct)

    def put(self, key: str, result: ModelEval) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"key": key, "metrics": result.metrics, "picks": result.picks.tolist()})
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(temporary, self.directory / f"{key}.json")
