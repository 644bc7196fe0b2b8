"""Comparing models on the same items (paired-bootstrap confidence intervals) and the
report: eval.json (metrics, comparisons, picks, and what was scored) and eval.md."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raymed.config import Config, EvalConfig
from raymed.errors import RaymedError
from raymed.eval.items import items_digest
from raymed.eval.models import model_digest

REPORT_FILE = "eval.json"
TABLE_FILE = "eval.md"


def paired_bootstrap(reference: np.ndarray, candidate: np.ndarray, *, samples: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> tuple[float, float, float]:
    """(difference of means, low, high): candidate − reference accuracy over the same items,
    with a percentile confidence interval from resampling the items (paired, fixed seed)."""
    diff = np.asarray(candidate, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    if diff.size == 0:
        raise RaymedError("no items to compare")
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, 256):  # bounded memory whatever the item count
        rows = min(256, samples - start)
        means[start:start + rows] = diff[rng.integers(0, diff.size, size=(rows, diff.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(diff.mean()), float(low), float(high)


@dataclass
class ModelEval:
    """One model's results on the shared items and blocks."""

    label: str
    path: str
    metrics: dict[str, float]
    picks: np.ndarray = field(repr=False)
    correct: np.ndarray = field(repr=False)


def compare(reference: ModelEval, candidate: ModelEval, items: list[dict], eval_config: EvalConfig,
            seed: int = 0) -> dict[str, dict]:
    """Per metric: the difference candidate − reference; for accuracies also its CI."""
    out = {}
    for name in candidate.metrics:
        if name not in reference.metrics:
            continue
        entry = {"diff": candidate.metrics[name] - reference.metrics[name]}
        mask = _mask_for(name, items)
        if mask is not None and mask.any():
            _, low, high = paired_bootstrap(reference.correct[mask], candidate.correct[mask],
                                            samples=eval_config.bootstrap_samples, seed=seed,
                                            confidence=eval_config.confidence)
            entry["ci"] = [low, high]
        out[name] = entry
    return out


def _mask_for(metric: str, items: list[dict]) -> np.ndarray | None:
    """Which items an accuracy metric is over (None for a non-accuracy metric)."""
    if metric == "mcq_acc":
        return np.ones(len(items), dtype=bool)
    if metric.startswith("mcq_acc/"):
        group = metric.split("/", 1)[1]
        return np.array([group in (item["split"], item["source"]) for item in items])
    return None


def build_report(config: Config, items: list[dict], results: dict[str, ModelEval],
                 reference: str | None = None, items_path: str | None = None) -> dict:
    """The eval.json content: every model's metrics and, against `reference`, each other
    model's differences with confidence intervals; what was scored is identified by the
    items' hash and each model's file checksums."""
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "items": {"path": items_path, "count": len(items), "seed": config.seed, "sha256": items_digest(items),
                  "splits": _counts(items, "split"), "sources": _counts(items, "source")},
        "confidence": config.eval.confidence,
        "bootstrap_samples": config.eval.bootstrap_samples,
        "reference": reference,
        "models": {label: {"path": r.path, "sha256": model_digest(Path(r.path)), "metrics": r.metrics}
                   for label, r in results.items()},
        "comparisons": {},
        "picks": {label: r.picks.tolist() for label, r in results.items()},
    }
    if reference is not None:
        for label, result in results.items():
            if label != reference:
                report["comparisons"][label] = compare(results[reference], result, items, config.eval, config.seed)
    return report


def _counts(items: list[dict], key: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item[key]] = counts.get(item[key], 0) + 1
    return dict(sorted(counts.items()))


def render_table(report: dict) -> str:
    """A markdown table: one row per metric, one column per model, and for each model
    compared with the reference its difference and confidence interval."""
    labels = list(report["models"])
    compared = list(report["comparisons"])
    level = round(report["confidence"] * 100)
    header = ["metric", "n", *labels, *(f"{c} − {report['reference']} ({level}% CI)" for c in compared)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    names = list(dict.fromkeys(n for m in report["models"].values() for n in m["metrics"]))
    counts = {"mcq_acc": report["items"]["count"],
              **{f"mcq_acc/{k}": v for k, v in (report["items"]["splits"] | report["items"]["sources"]).items()}}
    for name in names:
        row = [name, str(counts.get(name, ""))]
        row += [_fmt(report["models"][label]["metrics"].get(name)) for label in labels]
        for label in compared:
            entry = report["comparisons"][label].get(name)
            row.append("" if entry is None else _fmt_diff(entry))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


def _fmt_diff(entry: dict) -> str:
    text = f"{entry['diff']:+.4f}"
    if "ci" in entry:
        text += f" [{entry['ci'][0]:+.3f}, {entry['ci'][1]:+.3f}]"
    return text


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """eval.json and eval.md in `out_dir`."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    json_path, table_path = out / REPORT_FILE, out / TABLE_FILE
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    table_path.write_text(render_table(report) + "\n")
    return json_path, table_path


def read_scores(report: dict, items: list[dict], model_dir: Path, label: str) -> ModelEval | None:
    """The scores an eval.json's content holds for the model in `model_dir` on these same
    items (matched on the items' hash and the model's file checksums, not on names or
    paths), labelled `label`, so that a later step need not score it again; else None."""
    if report["items"].get("sha256") != items_digest(items):
        return None
    digest = model_digest(model_dir)
    for name, model in report["models"].items():
        if model.get("sha256") == digest and name in report["picks"]:
            picks = np.array(report["picks"][name])
            correct = picks == np.array([item["answer"] for item in items])
            return ModelEval(label, str(model_dir), model["metrics"], picks, correct)
    return None


def eval_dir(config: Config) -> Path:
    """Where a run's evaluation reports go: <storage_path>/runs/<run_name>/eval/."""
    return Path(config.storage_path).expanduser() / "runs" / config.run_name / "eval"
