"""Multiple-choice eval items: where they are, loading and checking them, and accuracy by
split and source."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np

from raymed.errors import RaymedError

def resolve_items_path(name: str) -> Path:
    """An eval set in RAYMED_CACHE/eval (`medical-mcq-v1`) or a jsonl file."""
    from raymed.assets import ASSETS, asset_path

    rel = f"eval/{name}.jsonl"
    if any(rel in a.outputs for a in ASSETS):
        return asset_path(rel)
    path = Path(name).expanduser()
    if not path.is_file():
        raise RaymedError(f"eval items {name!r} not found: give a jsonl file or a cached eval set (medical-mcq-v1)")
    return path


def load_items(path: str | Path, *, max_items: int | None = None, seed: int = 0) -> list[dict]:
    """The items of a jsonl eval file, each checked; a seeded sample of `max_items`."""
    items = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise RaymedError(f"eval file {path} line {number}: not valid JSON ({err.msg})") from None
            problem = item_problem(item)
            if problem:
                raise RaymedError(f"eval file {path} line {number}: {problem}")
            items.append(item)
    if not items:
        raise RaymedError(f"eval file {path} has no items")
    if max_items is not None and max_items < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), max_items))
        items = [items[i] for i in keep]
    return items


def item_problem(item) -> str | None:
    """Why an eval item is malformed, or None. Items look like
    {"question": str, "options": [str, ...], "answer": index, "source": str, "split": str}."""
    if not isinstance(item, dict):
        return f"an item must be a JSON object, got {type(item).__name__}"
    question, options, answer = item.get("question"), item.get("options"), item.get("answer")
    if not isinstance(question, str) or not question.strip():
        return f"question must be a non-empty string (got {question!r})"
    if not isinstance(options, list) or len(options) < 2:
        return f"options must be a list of at least 2 strings (got {options!r})"
    if not all(isinstance(o, str) and o.strip() for o in options):
        return f"every option must be a non-empty string (got {options!r})"
    if len({o.strip() for o in options}) != len(options):
        return f"options must differ (got {options!r})"
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):
        return f"answer must be an index into options, 0..{len(options) - 1} (got {answer!r})"
    for key in ("source", "split"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            return f"{key} must be a non-empty string (got {item.get(key)!r})"
    return None


def mcq_metrics(items: list[dict], correct: np.ndarray) -> dict[str, float]:
    """`mcq_acc` over all items, `mcq_acc/<split>` and `mcq_acc/<source>` over each group."""
    metrics = {"mcq_acc": float(np.mean(correct))}
    for key in ("split", "source"):
        for group in sorted({item[key] for item in items}):
            mask = group_mask(items, key, group)
            metrics[f"mcq_acc/{group}"] = float(np.mean(correct[mask]))
    return metrics


def group_mask(items: list[dict], key: str, value: str) -> np.ndarray:
    return np.array([item[key] == value for item in items])


def items_digest(items: list[dict]) -> str:
    """Identifies a list of items by its content (order included)."""
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()
