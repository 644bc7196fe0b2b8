"""The promotion gate: evaluate candidate checkpoints against the registry's current
version and promote the best one only when it is better.

Gate rules (config `eval`):
- the best candidate (by `gate_metric`: lowest `val_loss`, or highest `mcq_acc`) must beat
  the current version on it by more than `min_improvement`, on the same data;
- and must not regress significantly on the held-out-entities split: rejected when the
  paired-bootstrap CI of its held-out accuracy minus the current version's lies wholly
  below −`heldout_tolerance` (in-domain validation loss almost always improves, so it
  alone proves little).
A rejected candidate leaves the registry untouched; the result says why.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from raymed.config import Config, EvalConfig
from raymed.errors import RaymedError
from raymed.eval import (
    ModelEval,
    build_report,
    evaluate_models,
    find_checkpoints,
    group_mask,
    load_items,
    paired_bootstrap,
    read_scores,
    render_table,
    resolve_items_path,
    resolve_model_dir,
    write_report,
)
from raymed.eval.score_cache import ScoreCache, scoring_key
from raymed.registry import Registry, StaleCurrent


@dataclass
class PromotionResult:
    """What a promotion did and why."""

    accepted: bool
    reason: str
    version: str | None
    """The new version when accepted, else None."""
    previous: str | None
    """`current` before (None when the registry was empty and there is no base model)."""
    candidate: str | None
    """The best candidate's directory."""
    report: dict = field(repr=False)
    report_path: Path | None = None

    @property
    def current(self) -> str | None:
        return self.version if self.accepted else self.previous


def promote_best(candidates: Sequence[str | Path], config: Config, *, source: str | None = None,
                 out_dir: str | Path | None = None, validation: bool = True,
                 scored_report: str | Path | None = None) -> PromotionResult:
    """Evaluate `candidates` (model directories, checkpoints, or run directories holding
    `checkpoint_*`) against the registry's current version (registering the base model as
    v1 on first use) and promote the best if it passes the gate. `source` names the run or
    trial for the manifest. A candidate already scored in `scored_report` (an eval.json, as
    the pipeline's evaluate stage writes, of the same files on the same items) is not
    scored again; nor is the current version when the registry's score cache holds its
    scores on the same items and data (`VersionScores`). Writes
    eval.json / eval.md (with the decision) to `out_dir` (default
    <storage_path>/runs/<run_name>/promote/)."""
    directories = list(dict.fromkeys(d for c in candidates for d in find_checkpoints(c)))
    if not directories:
        raise RaymedError("no candidates to promote")
    registry = Registry.for_config(config)
    current = ensure_base(registry, config)
    labels = {f"c{i}": d for i, d in enumerate(directories, 1)}
    items_path = resolve_items_path(config.eval.mcq_path)
    items = load_items(items_path, max_items=config.eval.max_items, seed=config.seed)
    scores = VersionScores(registry, config, items, validation)
    known = _scored_candidates(scored_report, labels, items) if scored_report else {}
    if current and (cached := scores.get(current)) is not None:
        known[current] = cached
    models = {current: registry.path(current)} if current else {}
    to_score = {label: d for label, d in (models | labels).items() if label not in known}
    results = evaluate_models(config, to_score, items=items, validation=validation)[1] if to_score else {}
    if current in results:
        scores.put(current, results[current])
    results = {label: results[label] if label in results else known[label] for label in [*models, *labels]}
    best = best_candidate([results[label] for label in labels], config.eval.gate_metric)
    report = build_report(config, items, results, reference=current, items_path=str(items_path))
    accepted, reason = gate(results.get(current), best, items, config.eval, config.seed)
    version = None
    if accepted:
        manifest = candidate_manifest(config, best, results.get(current), current, reason, source, items_path)
        try:
            version = registry.add(best.path, manifest, expect_current=current)
            scores.put(version, best)
            reason = f"promoted {best.label} ({best.path}) as {version}: {reason}"
        except StaleCurrent as err:
            accepted, reason = False, str(err)
    else:
        reason = f"rejected {best.label} ({best.path}): {reason}"
    report["decision"] = {"accepted": accepted, "reason": reason, "version": version, "previous": current,
                          "candidate": best.label, "gate_metric": config.eval.gate_metric}
    out = Path(out_dir) if out_dir else Path(config.storage_path).expanduser() / "runs" / config.run_name / "promote"
    json_path, _ = write_report(report, out)
    return PromotionResult(accepted, reason, version, current, best.path, report, json_path)


class VersionScores:
    """Registry versions' scores on these items (and validation blocks), cached beside the
    registry (raymed.eval.score_cache): a version is scored once per registry, not once per
    promotion."""

    def __init__(self, registry: Registry, config: Config, items: list[dict], validation: bool):
        self.registry, self.config, self.items, self.validation = registry, config, items, validation
        self.corpus = data_fingerprint(config)["sha256"] if validation else None

    def _cache_and_key(self, version: str) -> tuple[ScoreCache, str]:
        directory = self.registry.path(version)
        key = scoring_key(self.config, directory, self.items, self.validation, self.corpus)
        return ScoreCache(self.registry.scores_dir(version)), key

    def get(self, version: str) -> ModelEval | None:
        cache, key = self._cache_and_key(version)
        return cache.get(key, version, self.registry.path(version), self.items)

    def put(self, version: str, result: ModelEval) -> None:
        cache, key = self._cache_and_key(version)
        cache.put(key, result)


def _scored_candidates(report_path: str | Path, labels: dict[str, Path], items: list[dict]) -> dict[str, ModelEval]:
    """The candidates (by label) whose scores `report_path` already holds: the same files
    scored on the same items."""
    report = json.loads(Path(report_path).read_text())
    found = {label: read_scores(report, items, resolve_model_dir(directory), label)
             for label, directory in labels.items()}
    return {label: scores for label, scores in found.items() if scores is not None}


def ensure_base(registry: Registry, config: Config) -> str | None:
    """The current version, after registering the base model as v1 if the registry is
    empty (None when it is empty and the config trains from scratch: no base to serve)."""
    current = registry.current()
    if current is not None:
        return current
    if registry.versions():  # a crash between a first version's rename and `current`
        latest = registry.versions()[-1]
        registry.rollback(latest)
        return latest
    if config.model.init == "scratch":
        return None
    from raymed.assets import resolve_pretrained

    base = resolve_model_dir(resolve_pretrained(config.model.name))
    manifest = {"base_model": config.model.name, "source": {"base_model": str(base)}, "metrics": {},
                "config": config.model_dump(), "data_fingerprint": None}
    try:
        return registry.add(base, manifest, expect_current=None)
    except StaleCurrent:  # another process registered first
        return registry.current()


def resolve_current(config: Config) -> Path:
    """The directory of the version to serve (the base model, registered, on first use)."""
    registry = Registry.for_config(config)
    current = ensure_base(registry, config)
    if current is None:
        raise RaymedError(f"registry {registry.root} is empty and model.init is scratch (no base model): "
                          "promote a trained checkpoint first (`raymed promote --candidate DIR`)")
    return registry.path(current)


def best_candidate(results: list[ModelEval], gate_metric: str) -> ModelEval:
    """The candidate best on the gate metric (the first on a tie)."""
    sign = 1 if gate_metric == "val_loss" else -1
    missing = [r.label for r in results if gate_metric not in r.metrics]
    if missing:
        raise RaymedError(f"gate metric {gate_metric} was not measured for {', '.join(missing)}")
    return min(results, key=lambda r: sign * r.metrics[gate_metric])


def gate(current: ModelEval | None, candidate: ModelEval, items: list[dict], eval_config: EvalConfig,
         seed: int = 0) -> tuple[bool, str]:
    """(accepted, why) for `candidate` against the current version."""
    if current is None:
        return True, "the registry is empty and there is no base model to beat"
    metric = eval_config.gate_metric
    before, after = current.metrics[metric], candidate.metrics[metric]
    gain = before - after if metric == "val_loss" else after - before
    if not gain > eval_config.min_improvement:
        need = f"by more than {eval_config.min_improvement:g}" if eval_config.min_improvement else ""
        return False, (f"{metric} {after:.4f} does not beat {current.label}'s {before:.4f} {need}".rstrip())
    verdict = f"{metric} {before:.4f} → {after:.4f}"
    mask = group_mask(items, "split", eval_config.heldout_split)
    if not mask.any():
        return True, f"{verdict}; no {eval_config.heldout_split!r} items, so no regression check"
    diff, low, high = paired_bootstrap(current.correct[mask], candidate.correct[mask],
                                       samples=eval_config.bootstrap_samples, seed=seed,
                                       confidence=eval_config.confidence)
    level = round(eval_config.confidence * 100)
    change = (f"{eval_config.heldout_split} accuracy {current.correct[mask].mean():.3f} → "
              f"{candidate.correct[mask].mean():.3f} (Δ {diff:+.3f}, {level}% CI [{low:+.3f}, {high:+.3f}], "
              f"n={int(mask.sum())})")
    if high < -eval_config.heldout_tolerance:
        return False, f"{verdict}, but {change} drops significantly"
    return True, f"{verdict}; {change}: no significant regression"


def candidate_manifest(config: Config, best: ModelEval, current: ModelEval | None, current_version: str | None,
                       reason: str, source: str | None, items_path: Path) -> dict:
    """manifest.json content for a promoted candidate (the registry adds name, version,
    created time and file checksums)."""
    return {
        "base_model": config.model.name if config.model.init == "pretrained" else None,
        "source": {"run": config.run_name, "trial": source, "checkpoint": best.path},
        "metrics": best.metrics,
        "compared_with": {"version": current_version, "metrics": current.metrics if current else None,
                          "gate": reason},
        "eval_items": {"path": str(items_path), "sha256": _sha256_files([items_path])},
        "data_fingerprint": data_fingerprint(config),
        "config": config.model_dump(),
    }


def data_fingerprint(config: Config) -> dict:
    """A SHA-256 over the corpus files the model was trained on (path-independent), and each file's."""
    from raymed.assets import resolve_corpus

    train, validation = resolve_corpus(config.data.train_path, config.data.validation_path)
    files, unhashed = [], []
    for location in filter(None, dict.fromkeys([train, validation])):
        path = Path(location).expanduser()
        if "://" in location or not path.exists():
            unhashed.append(location)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        else:
            files.append(path)
    per_file = {str(p): _sha256_files([p]) for p in files}
    combined = hashlib.sha256("".join(f"{h}\n" for h in per_file.values()).encode()).hexdigest()
    return {"sha256": combined, "files": per_file, "not_hashed": unhashed}


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def describe(result: PromotionResult) -> str:
    """The table and the decision, as the CLI prints them."""
    return f"{render_table(result.report)}\n\n{result.reason}"
