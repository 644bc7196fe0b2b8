"""Scoring as Ray Data batch inference: a pool of actors that load each model once (one
GPU each when the cluster has GPUs) picks options for multiple-choice items and sums
next-token metrics over packed validation blocks."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from raymed.config import Config, EvalConfig
from raymed.console import init_ray, progress
from raymed.eval.models import load_model
from raymed.train.metrics import token_metrics, val_metrics

class _Scorer:
    """A Ray Data actor that scores rows for any of several models (column `model` holds
    the label): each model is loaded once, and the two most recent stay loaded, so one
    actor pool serves every model of an evaluation (rows arrive grouped by model)."""

    KEEP_LOADED = 2

    def __init__(self, models: dict[str, str], device: str):
        self.models, self.device = models, device
        self.loaded: OrderedDict[str, tuple] = OrderedDict()

    def model(self, label: str):
        if label not in self.loaded:
            while len(self.loaded) >= self.KEEP_LOADED:
                self.loaded.popitem(last=False)
            self.loaded[label] = load_model(self.models[label], self.device)
        self.loaded.move_to_end(label)
        return self.loaded[label]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        labels = batch["model"]
        parts = [self.score(str(label), {k: v[labels == label] for k, v in batch.items()})
                 for label in dict.fromkeys(labels)]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def score(self, label: str, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class MCQScorer(_Scorer):
    """Picks each item's option by the model's (length-normalised) log-likelihood."""

    def __init__(self, models: dict[str, str], device: str, length_norm: bool):
        super().__init__(models, device)
        self.length_norm = length_norm

    def score(self, label: str, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raymed.mcq import option_logprobs, pick

        model, tokenizer = self.model(label)
        picks = []
        for question, options_json, system in zip(rows["question"], rows["options"], rows["system"]):
            options = json.loads(options_json)
            logprobs = option_logprobs(model, tokenizer, str(question), options, str(system))
            picks.append(pick(options, logprobs, length_norm=self.length_norm))
        return {"model": rows["model"], "index": rows["index"], "pick": np.array(picks, dtype=np.int64)}


class BlockScorer(_Scorer):
    """Summed next-token loss, correct predictions and counted tokens of packed blocks."""

    def score(self, label: str, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        model, _ = self.model(label)
        tensors = {k: torch.tensor(rows[k], dtype=torch.long, device=self.device)  # a copy: Ray's arrays are read-only
                   for k in ("input_ids", "labels", "position_ids")}
        with torch.no_grad():
            logits = model(input_ids=tensors["input_ids"], position_ids=tensors["position_ids"]).logits
        loss, correct, count = token_metrics(logits, tensors["labels"])
        return {"model": np.array([label]), "loss_sum": np.array([loss]), "correct": np.array([correct]),
                "count": np.array([count]), "blocks": np.array([len(rows["model"])])}


def _actor_options(eval_config: EvalConfig) -> tuple[str, dict]:
    """The device actors use and their map_batches resources: one GPU each where the cluster has GPUs."""
    import ray

    init_ray()
    device = eval_config.device
    if device == "auto":
        device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    options = {"compute": ray.data.ActorPoolStrategy(size=eval_config.actors), "num_cpus": eval_config.cpus_per_actor}
    if device == "cuda":
        options["num_gpus"] = 1
    return device, options


def score_items(models: dict[str, Path], items: list[dict], eval_config: EvalConfig) -> dict[str, np.ndarray]:
    """The option each model picks for each item (Ray Data batch inference on one actor pool)."""
    import ray

    device, options = _actor_options(eval_config)
    rows = [{"model": label, "index": i, "question": item["question"], "options": json.dumps(item["options"]),
             "system": item.get("system", "")}  # a system message: the grounded eval's (raymed.index.evaluate)
            for label in models for i, item in enumerate(items)]
    dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), 4 * eval_config.actors * len(models)))
    scored = dataset.map_batches(
        MCQScorer, fn_constructor_kwargs={"models": _plain(models), "device": device,
                                          "length_norm": eval_config.length_norm},
        batch_size=eval_config.items_per_batch, batch_format="numpy", **options,
    )
    picks = {label: np.full(len(items), -1, dtype=np.int64) for label in models}
    with progress("multiple choice", total=len(rows), unit="item") as bar:
        for batch in scored.iter_batches(batch_format="numpy", batch_size=None):
            for label, index, choice in zip(batch["model"], batch["index"], batch["pick"]):
                picks[str(label)][index] = choice
            bar.update(len(batch["index"]))
    return picks


def score_blocks(models: dict[str, Path], blocks: dict[str, object], eval_config: EvalConfig) -> dict[str, dict]:
    """val_loss / val_ppl / val_token_acc of each model over its Dataset of packed blocks
    (`blocks[label]`; models sharing a tokenizer share one), on one actor pool."""
    device, options = _actor_options(eval_config)
    tagged = [blocks[label].select_columns(["input_ids", "labels", "position_ids"])
              .map_batches(_tag, fn_kwargs={"label": label}, batch_format="numpy") for label in models]
    # Materialized first: the actor pool may take every CPU, and a task stage upstream of it
    # would then never be scheduled (a deadlock on a 2-CPU machine with eval.actors=2).
    dataset = (tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]).materialize()
    scored = dataset.map_batches(
        BlockScorer, fn_constructor_kwargs={"models": _plain(models), "device": device},
        batch_size=eval_config.blocks_per_batch, batch_format="numpy", **options,
    )
    totals = {label: np.zeros(3, dtype=np.float64) for label in models}
    with progress("validation", total=sum(blocks[label].count() for label in models), unit="block") as bar:
        for batch in scored.iter_batches(batch_format="numpy", batch_size=None):
            for label, *sums in zip(batch["model"], batch["loss_sum"], batch["correct"], batch["count"]):
                totals[str(label)] += sums
            bar.update(int(batch["blocks"].sum()))
    return {label: val_metrics(t[0], int(t[1]), int(t[2])) for label, t in totals.items()}


def _tag(batch: dict[str, np.ndarray], label: str) -> dict[str, np.ndarray]:
    return {**batch, "model": np.full(len(batch["input_ids"]), label)}


def _plain(models: dict[str, Path]) -> dict[str, str]:
    return {label: str(path) for label, path in models.items()}


def validation_blocks(config: Config, tokenizer_dir: Path):
    """The data stage's validation blocks, tokenized with `tokenizer_dir`. With a separate
    validation file (the default corpus has one) only that file is read."""
    from raymed.assets import resolve_corpus
    from raymed.data.pipeline import build_datasets

    _, validation = resolve_corpus(config.data.train_path, config.data.validation_path)
    raw = config.model_dump()
    raw["model"]["tokenizer"] = str(tokenizer_dir)
    if validation:
        raw["data"]["train_path"] = raw["data"]["validation_path"] = validation
    datasets, _ = build_datasets(Config.model_validate(raw))
    return datasets["validation"]
