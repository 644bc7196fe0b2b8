"""Small training corpora for tests that run Ray Train (importable as `corpora`)."""

from __future__ import annotations

import json
from pathlib import Path


def signs_corpus(directory: Path) -> Path:
    """80 short question/answer records: a few seconds of ci-tiny training."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "qa.jsonl"
    corpus.write_text("".join(
        json.dumps({"question": f"What is sign {i}?", "answer": f"Sign {i} suggests infection."}) + "\n"
        for i in range(80)))
    return corpus
