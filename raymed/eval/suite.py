"""The whole evaluation: several models (base and candidate, or the registry's current
version and a sweep's checkpoints) scored on the same items and blocks, and the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raymed.config import Config
from raymed.eval.items import load_items, mcq_metrics, resolve_items_path
from raymed.eval.models import resolve_model_dir, tokenizer_digest
from raymed.eval.report import ModelEval, build_report, eval_dir, write_report
from raymed.eval.scoring import score_blocks, score_items, validation_blocks


def evaluate_models(config: Config, models: dict[str, str | Path], *, items: list[dict] | None = None,
                    validation: bool = True) -> tuple[list[dict], dict[str, ModelEval]]:
    """Score every model on the same items (and the same validation blocks per tokenizer)."""
    directories = {label: resolve_model_dir(path) for label, path in models.items()}
    if items is None:
        items = load_items(resolve_items_path(config.eval.mcq_path), max_items=config.eval.max_items, seed=config.seed)
    blocks = None
    if validation:
        by_tokenizer: dict[str, object] = {}
        blocks = {}
        for label, directory in directories.items():
            key = tokenizer_digest(directory)
            if key not in by_tokenizer:
                by_tokenizer[key] = validation_blocks(config, directory)
            blocks[label] = by_tokenizer[key]
    return items, results_from(config, directories, items, blocks)


def results_from(config: Config, directories: dict[str, Path], items: list[dict],
                 blocks: dict[str, object] | None) -> dict[str, ModelEval]:
    """Every model's results: validation metrics on its `blocks` (None: none scored) and
    multiple-choice picks, all models in one Ray Data pass each."""
    metrics: dict[str, dict] = {label: {} for label in directories}
    if blocks is not None:
        for label, values in score_blocks(directories, blocks, config.eval).items():
            metrics[label] |= values
    picks = score_items(directories, items, config.eval)
    answers = np.array([item["answer"] for item in items])
    results = {}
    for label, directory in directories.items():
        correct = picks[label] == answers
        results[label] = ModelEval(label, str(directory), metrics[label] | mcq_metrics(items, correct),
                                   picks[label], correct)
    return results


def evaluate(config: Config, model: str | Path, *, base: str | Path | None = None,
             out_dir: str | Path | None = None, validation: bool = True) -> tuple[dict, Path]:
    """Evaluate `model` (and `base`, as the reference) and write the report; (report, eval.json path)."""
    items_path = resolve_items_path(config.eval.mcq_path)
    items = load_items(items_path, max_items=config.eval.max_items, seed=config.seed)
    models = {"base": base, "candidate": model} if base is not None else {"model": model}
    items, results = evaluate_models(config, models, items=items, validation=validation)
    report = build_report(config, items, results, reference="base" if base is not None else None,
                          items_path=str(items_path))
    json_path, _ = write_report(report, out_dir or eval_dir(config))
    return report, json_path
