"""Evaluation as Ray Data batch inference: validation loss, perplexity and next-token
accuracy on the validation blocks, and multiple-choice accuracy on the eval items, each
run by a pool of actors that load the model once (one GPU each when the cluster has GPUs).

Several models (base and candidate, or the registry's current version and a sweep's
checkpoints) are scored on the same items and blocks; accuracy differences come with a
paired-bootstrap confidence interval (fixed seed), so noise can be told from gain.

    evaluate(config, model_dir, base=dir) -> (report dict, eval.json path)

One module per concern: models (directories), items (multiple-choice sets), scoring (the
Ray Data actors), report (comparison and eval.json / eval.md), suite (the whole run).
"""

from raymed.eval.items import group_mask, item_problem, items_digest, load_items, mcq_metrics, resolve_items_path
from raymed.eval.models import find_checkpoints, load_model, model_digest, resolve_model_dir, tokenizer_digest
from raymed.eval.report import (
    REPORT_FILE,
    TABLE_FILE,
    ModelEval,
    build_report,
    compare,
    eval_dir,
    paired_bootstrap,
    read_scores,
    render_table,
    write_report,
)
from raymed.eval.scoring import score_blocks, score_items, validation_blocks
from raymed.eval.suite import evaluate, evaluate_models

__all__ = [
    "REPORT_FILE", "TABLE_FILE", "ModelEval", "build_report", "compare", "eval_dir", "evaluate", "evaluate_models",
    "find_checkpoints", "group_mask", "item_problem", "items_digest", "load_items", "load_model", "mcq_metrics",
    "model_digest", "paired_bootstrap", "read_scores", "render_table", "resolve_items_path", "resolve_model_dir",
    "score_blocks", "score_items", "tokenizer_digest", "validation_blocks", "write_report",
]
