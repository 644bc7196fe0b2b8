"""Evaluation as Ray Data batch inference: validation loss, perplexity and next-token
accuracy on the validation blocks, and multiple-choice accuracy on the eval items, each
run by a pool of actors that load the model once (one GPU each when the cluster has GPUs).

Several models (base and candidate, or the registry's current version and a sweep's
checkpoints) are scored on the same items and blocks; accuracy differences come with a
paired-bootstrap confidence interval (fixed seed), so noise can be told from gain.

    evaluate(config, {"base": dir, "candidate": dir}) -> report dict
    write_report(report, out_dir) -> eval.json + eval.md
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from raymed.config import Config, EvalConfig
from raymed.errors import RaymedError

REPORT_FILE = "eval.json"
TABLE_FILE = "eval.md"
WEIGHT_SUFFIXES = (".safetensors",)
UNSAFE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model")


# ---------------------------------------------------------------- model directories

def resolve_model_dir(path: str | Path) -> Path:
    """A Hugging Face model directory with safetensors weights and a tokenizer: the path
    itself (a training checkpoint is one) or its `model/` subdirectory."""
    given = Path(path).expanduser()
    if not given.is_dir():
        raise RaymedError(f"{path} is not a directory: give a Hugging Face model directory or a training checkpoint")
    directory = given / "model" if not (given / "config.json").is_file() and (given / "model" / "config.json").is_file() else given
    if not (directory / "config.json").is_file():
        raise RaymedError(f"{path} is not a model directory (no config.json): give a Hugging Face model "
                          "directory or a training checkpoint")
    names = [p.name for p in directory.iterdir() if p.is_file()]
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        unsafe = sorted(n for n in names if n.endswith(UNSAFE_WEIGHTS) and n not in ("optimizer.pt", "scheduler.pt"))
        why = f"only {', '.join(unsafe)}, and only safetensors weights are loaded" if unsafe else "no *.safetensors weights"
        raise RaymedError(f"{path} is not a loadable model: {why}")
    if not any(n in ("tokenizer.json", "tokenizer_config.json") for n in names):
        raise RaymedError(f"{path} has no tokenizer (tokenizer.json / tokenizer_config.json): save it with the model")
    try:
        architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as err:
        raise RaymedError(f"{directory / 'config.json'} is not valid JSON: {err}") from None
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise RaymedError(f"{path} is a {', '.join(architectures)}, not a causal language model")
    return directory


def find_checkpoints(path: str | Path) -> list[Path]:
    """The model directories under `path`: itself when it is one, else every Ray Train
    checkpoint (`checkpoint_*`) below it, e.g. a run's `train/` directory."""
    given = Path(path).expanduser()
    if given.is_dir() and not (given / "config.json").is_file() and not (given / "model").is_dir():
        found = sorted(p for p in given.rglob("checkpoint_*") if p.is_dir() and (p / "config.json").is_file())
        if found:
            return [resolve_model_dir(p) for p in found]
    return [resolve_model_dir(given)]


def load_model(model_dir: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a model directory: safetensors only, no remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True,
                                                     trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise RaymedError(f"{model_dir} is not a causal LM that transformers can load: {err}") from None
    return model.to(device).eval(), tokenizer


def tokenizer_digest(model_dir: Path) -> str:
    """Identifies a tokenizer by its files, so models sharing one share validation blocks."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            digest.update(name.encode() + b"\0" + (model_dir / name).read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- multiple-choice items

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


# ---------------------------------------------------------------- Ray Data actors

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
        from raymed.train import token_metrics

        model, _ = self.model(label)
        tensors = {k: torch.as_tensor(np.asarray(rows[k]), dtype=torch.long).to(self.device)
                   for k in ("input_ids", "labels", "position_ids")}
        with torch.no_grad():
            logits = model(input_ids=tensors["input_ids"], position_ids=tensors["position_ids"]).logits
        loss, correct, count = token_metrics(logits, tensors["labels"])
        return {"model": np.array([label]), "loss_sum": np.array([loss]), "correct": np.array([correct]),
                "count": np.array([count]), "blocks": np.array([len(rows["model"])])}


def val_metrics(loss_sum: float, correct: int, count: int) -> dict[str, float]:
    """val_loss (mean next-token loss), val_ppl = exp(val_loss), val_token_acc."""
    if count == 0:
        raise RaymedError("the validation data has no tokens to score: give more data or a validation_path")
    val_loss = loss_sum / count
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)), "val_token_acc": correct / count}


def _actor_options(eval_config: EvalConfig) -> tuple[str, dict]:
    """The device actors use and their map_batches resources: one GPU each where the cluster has GPUs."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
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
    with tqdm(total=len(rows), desc="multiple choice", unit="item") as bar:
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
    with tqdm(total=sum(blocks[label].count() for label in models), desc="validation", unit="block") as bar:
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


# ---------------------------------------------------------------- comparison

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


# ---------------------------------------------------------------- the whole evaluation

def evaluate_models(config: Config, models: dict[str, str | Path], *, items: list[dict] | None = None,
                    validation: bool = True) -> tuple[list[dict], dict[str, ModelEval]]:
    """Score every model on the same items (and the same validation blocks per tokenizer)."""
    directories = {label: resolve_model_dir(path) for label, path in models.items()}
    if items is None:
        items = load_items(resolve_items_path(config.eval.mcq_path), max_items=config.eval.max_items, seed=config.seed)
    metrics: dict[str, dict] = {label: {} for label in directories}
    if validation:
        by_tokenizer: dict[str, object] = {}
        blocks = {}
        for label, directory in directories.items():
            key = tokenizer_digest(directory)
            if key not in by_tokenizer:
                by_tokenizer[key] = validation_blocks(config, directory)
            blocks[label] = by_tokenizer[key]
        for label, values in score_blocks(directories, blocks, config.eval).items():
            metrics[label] |= values
    picks = score_items(directories, items, config.eval)
    answers = np.array([item["answer"] for item in items])
    results = {}
    for label, directory in directories.items():
        correct = picks[label] == answers
        results[label] = ModelEval(label, str(directory), metrics[label] | mcq_metrics(items, correct),
                                   picks[label], correct)
    return items, results


def build_report(config: Config, items: list[dict], results: dict[str, ModelEval],
                 reference: str | None = None, items_path: str | None = None) -> dict:
    """The eval.json content: every model's metrics and, against `reference`, each other
    model's differences with confidence intervals."""
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "items": {"path": items_path, "count": len(items), "seed": config.seed,
                  "splits": _counts(items, "split"), "sources": _counts(items, "source")},
        "confidence": config.eval.confidence,
        "bootstrap_samples": config.eval.bootstrap_samples,
        "reference": reference,
        "models": {label: {"path": r.path, "metrics": r.metrics} for label, r in results.items()},
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


def read_scores(report: dict, label: str, items: list[dict], items_path: str | None, seed: int) -> ModelEval | None:
    """`label`'s scores from an eval.json's content written for these same items (path,
    count and seed), so that a later step need not score that model again; None for other
    items."""
    if (report["items"]["path"], report["items"]["count"], report["items"]["seed"]) != (items_path, len(items), seed) \
            or label not in report["picks"]:
        return None
    picks = np.array(report["picks"][label])
    correct = picks == np.array([item["answer"] for item in items])
    model = report["models"][label]
    return ModelEval(label, model["path"], model["metrics"], picks, correct)


def eval_dir(config: Config) -> Path:
    """Where a run's evaluation reports go: <storage_path>/runs/<run_name>/eval/."""
    return Path(config.storage_path).expanduser() / "runs" / config.run_name / "eval"


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
