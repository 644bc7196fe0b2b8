"""`raymed eval --grounded`: multiple-choice accuracy with and without the context the
server adds, and the retriever's recall on the items.

Each item is asked twice, as the Gateway would send it: with the safety system prompt
alone (ungrounded) and with the top `serve.grounding_k` passages the same index returns for
the question (grounded; raymed.serve.grounding builds both prompts). Both variants go through
eval's one Ray Data actor pool (`raymed.eval.score_items`) in a single pass, so every
difference is paired over the same items and models, with eval's bootstrap intervals.

Recall@k: the passage of the entity an item asks about (`<source>:<entity>`) is among the
top k passages for its question.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from raymed.config import Config
from raymed.console import say
from raymed.eval import (ModelEval, compare, eval_dir, load_items, mcq_metrics, paired_bootstrap, resolve_items_path,
                         resolve_model_dir, score_items)
from raymed.index import open_index
from raymed.serve.grounding import with_references
from raymed.serve.safety import with_system_prompt

REPORT_FILE = "grounded.json"
TABLE_FILE = "grounded.md"
RECALL_AT = (1, 5)


def system_message(question: str, passages: list[dict]) -> str:
    """The system message the Gateway sends with `question` (no passages: the ungrounded one)."""
    return with_references(with_system_prompt([{"role": "user", "content": question}]), passages)[0]["content"]


def retrieve_for(items: list[dict], config: Config) -> list[list[dict]]:
    """The top max(k, 5) passages for each item's question, from the index the server uses."""
    index = open_index(config.index)
    depth = max(config.serve.grounding_k, *RECALL_AT)
    return [index.search(item["question"], depth) for item in items]


def recall(items: list[dict], retrieved: list[list[dict]], k: int) -> dict[str, float]:
    """recall@k over all items (`all`) and per split and source."""
    hits = np.array([f"{item['source']}:{item.get('entity')}" in [p["id"] for p in found[:k]]
                     for item, found in zip(items, retrieved)], dtype=float)
    return {name.split("/", 1)[1] if "/" in name else "all": value for name, value in mcq_metrics(items, hits).items()}


def evaluate_grounded(config: Config, models: dict[str, str | Path], out_dir: str | Path | None = None) -> dict:
    """Score every model ungrounded and grounded on the eval items; write grounded.json/.md."""
    items_path = resolve_items_path(config.eval.mcq_path)
    items = load_items(items_path, max_items=config.eval.max_items, seed=config.seed)
    retrieved = retrieve_for(items, config)
    k = config.serve.grounding_k
    variants = [{**item, "system": system_message(item["question"], [])} for item in items] + \
               [{**item, "system": system_message(item["question"], found[:k])} for item, found in zip(items, retrieved)]
    directories = {label: resolve_model_dir(path) for label, path in models.items()}
    picks = score_items(directories, variants, config.eval)
    answers = np.array([item["answer"] for item in items])
    report = {"items": {"path": str(items_path), "count": len(items), "seed": config.seed},
              "index": config.index.name, "grounding_k": k, "confidence": config.eval.confidence,
              "recall": {f"@{n}": recall(items, retrieved, n) for n in sorted({*RECALL_AT, k})}, "models": {}}
    for label, directory in directories.items():
        plain, grounded = (picks[label][:len(items)] == answers), (picks[label][len(items):] == answers)
        results = {name: ModelEval(name, str(directory), mcq_metrics(items, correct), picks[label], correct)
                   for name, correct in (("ungrounded", plain), ("grounded", grounded))}
        report["models"][label] = {
            "path": str(directory),
            **{name: _with_intervals(r, items, config) for name, r in results.items()},
            "gain": compare(results["ungrounded"], results["grounded"], items, config.eval, config.seed),
        }
    out = Path(out_dir or eval_dir(config)).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    (out / TABLE_FILE).write_text(render(report) + "\n")
    report["written"] = str(out / REPORT_FILE)
    return report


def run_grounded_eval(config: Config, model: str, base: str | None, out_dir: Path | None) -> int:
    """`raymed eval --grounded`: print the table, say where the report went."""
    models = {"base": base, "model": model} if base else {"model": model}
    report = evaluate_grounded(config, models, out_dir)
    say(render(report))
    say(f"\nwrote {report['written']} and {Path(report['written']).with_name(TABLE_FILE)}")
    return 0


def _with_intervals(result: ModelEval, items: list[dict], config: Config) -> dict[str, dict]:
    """Each accuracy with its bootstrap confidence interval (resampling the items, fixed seed)."""
    out = {}
    for name, value in result.metrics.items():
        group = name.split("/", 1)[1] if "/" in name else None
        mask = np.array([group in (None, item["split"], item["source"]) for item in items])
        _, low, high = paired_bootstrap(np.zeros(int(mask.sum())), result.correct[mask],
                                        samples=config.eval.bootstrap_samples, seed=config.seed,
                                        confidence=config.eval.confidence)
        out[name] = {"acc": value, "ci": [low, high], "n": int(mask.sum())}
    return out


def render(report: dict) -> str:
    """Markdown: per model and metric, ungrounded and grounded accuracy and the gain, with intervals;
    then the retriever's recall."""
    level = round(report["confidence"] * 100)
    lines = [f"| model | metric | n | ungrounded ({level}% CI) | grounded ({level}% CI) | gain ({level}% CI) |",
             "|---|---|---|---|---|---|"]
    for label, entry in report["models"].items():
        for name, plain in entry["ungrounded"].items():
            grounded, gain = entry["grounded"][name], entry["gain"][name]
            lines.append(f"| {label} | {name} | {plain['n']} | {_acc(plain)} | {_acc(grounded)} | "
                         f"{gain['diff']:+.3f} [{gain['ci'][0]:+.3f}, {gain['ci'][1]:+.3f}] |")
    lines += ["", "| items | " + " | ".join(f"recall{at}" for at in report["recall"]) + " |",
              "|---|" + "---|" * len(report["recall"])]
    for group in next(iter(report["recall"].values())):
        lines.append(f"| {group} | " + " | ".join(f"{r[group]:.3f}" for r in report["recall"].values()) + " |")
    return "\n".join(lines)


def _acc(entry: dict) -> str:
    return f"{entry['acc']:.3f} [{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}]"
