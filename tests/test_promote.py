"""The promotion gate on constructed results, and a real promotion end to end: the base
model registered as v1 on first use, a better candidate promoted, a worse one rejected
with the registry left untouched."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from raymed.config import EvalConfig, load_config
from raymed.eval import ModelEval, load_items, read_scores, resolve_items_path
from raymed.promote import VersionScores, best_candidate, data_fingerprint, gate, promote_best
from raymed.registry import Registry


def _items(heldout: int, reworded: int) -> list[dict]:
    return ([{"split": "heldout", "source": "hpo"}] * heldout) + ([{"split": "reworded", "source": "hpo"}] * reworded)


def _result(label: str, val_loss: float, correct: list[bool]) -> ModelEval:
    correct = np.array(correct)
    return ModelEval(label, f"/models/{label}", {"val_loss": val_loss, "mcq_acc": float(correct.mean())},
                     correct.astype(int), correct)


def test_a_candidate_that_is_worse_on_the_gate_metric_is_rejected():
    items = _items(10, 10)
    accepted, reason = gate(_result("v1", 2.0, [True] * 20), _result("c1", 2.1, [True] * 20), items, EvalConfig())
    assert not accepted and reason == "val_loss 2.1000 does not beat v1's 2.0000"
    accepted, reason = gate(_result("v1", 2.0, [True] * 20), _result("c1", 1.95, [True] * 20), items,
                            EvalConfig(min_improvement=0.1))
    assert not accepted and reason.endswith("by more than 0.1")


def test_a_better_candidate_without_heldout_regression_is_accepted():
    items = _items(40, 40)
    current = _result("v1", 2.0, [True, False] * 40)
    candidate = _result("c1", 1.8, [False, True] * 20 + [True] * 40)  # held-out 20/40 either way
    accepted, reason = gate(current, candidate, items, EvalConfig())
    assert accepted and reason.startswith("val_loss 2.0000 → 1.8000; heldout accuracy 0.500 → 0.500 (Δ +0.000")
    assert reason.endswith("no significant regression")


def test_lower_val_loss_with_a_significant_heldout_drop_is_rejected():
    items = _items(60, 20)
    current = _result("v1", 2.0, [True] * 50 + [False] * 10 + [True] * 20)
    candidate = _result("c1", 1.5, [True] * 20 + [False] * 40 + [True] * 20)  # held-out 50/60 → 20/60
    accepted, reason = gate(current, candidate, items, EvalConfig())
    assert not accepted
    assert "heldout accuracy 0.833 → 0.333 (Δ -0.500, 95% CI [" in reason and reason.endswith("drops significantly")
    # a tolerance wider than the drop lets it through
    accepted, _ = gate(current, candidate, items, EvalConfig(heldout_tolerance=0.9))
    assert accepted


def test_gating_on_mcq_acc_prefers_higher_accuracy():
    items = _items(4, 4)
    low, high = _result("c1", 1.0, [False] * 4 + [True] * 4), _result("c2", 9.0, [True] * 8)
    assert best_candidate([low, high], "mcq_acc") is high
    assert best_candidate([low, high], "val_loss") is low
    accepted, reason = gate(low, high, items, EvalConfig(gate_metric="mcq_acc"))
    assert accepted and reason.startswith("mcq_acc 0.5000 → 1.0000")


def test_an_empty_registry_without_a_base_takes_the_first_candidate():
    accepted, reason = gate(None, _result("c1", 5.0, [False]), _items(1, 0), EvalConfig())
    assert accepted and "no base model" in reason


def test_data_fingerprint_hashes_the_corpus_files(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "a"}\n')
    config = load_config(None, [f"data.train_path={corpus}"])
    first = data_fingerprint(config)
    assert list(first["files"]) == [str(corpus)] and len(first["sha256"]) == 64
    corpus.write_text('{"text": "b"}\n')
    assert data_fingerprint(config)["sha256"] != first["sha256"]


def _train_on_corpus(model, tokenizer, steps: int = 40):
    """A few steps on the default corpus's training records: a model that is better on
    the validation split than the random one it started as."""
    from raymed.assets import resolve_corpus

    train_path, _ = resolve_corpus("medical-v1", None)
    with open(train_path) as lines:
        texts = [tokenizer.apply_chat_template(json.loads(next(lines))["messages"], tokenize=False)
                 for _ in range(64)]
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(steps):
        batch = tokenizer(texts[(step * 8) % 64:(step * 8) % 64 + 8], return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.slow
def test_promotion_end_to_end(ray_cluster, tiny_model, tmp_path):
    base = tiny_model.save(tiny_model(seed=0), tmp_path / "base")
    better = tiny_model.save(_train_on_corpus(tiny_model(seed=0), tiny_model.tokenizer), tmp_path / "better")
    worse = tiny_model.save(tiny_model(seed=5), tmp_path / "worse")
    config = load_config("ci-tiny", [
        f"storage_path={tmp_path / 'store'}", "model.init=pretrained", f"model.name={base}", "model.architecture={}",
        "eval.max_items=24", "eval.bootstrap_samples=500", "run_name=e2e",
        "data.max_validation_records=64"])  # a fixed sample of the validation file: enough to rank the three
    registry = Registry.for_config(config)

    result = promote_best([better], config, source="trial_1")
    assert result.accepted, result.reason
    assert (result.previous, result.version, registry.versions(), registry.current()) == ("v1", "v2", ["v1", "v2"], "v2")
    assert result.reason.startswith(f"promoted c1 ({better}) as v2: val_loss ")
    v1, v2 = registry.manifest("v1"), registry.manifest("v2")
    assert v1["source"] == {"base_model": str(base)} and v1["base_model"] == str(base)
    assert v2["source"] == {"run": "e2e", "trial": "trial_1", "checkpoint": str(better)}
    assert v2["metrics"]["val_loss"] < v2["compared_with"]["metrics"]["val_loss"]
    assert v2["compared_with"]["version"] == "v1" and len(v2["data_fingerprint"]["sha256"]) == 64
    assert v2["config"]["model"]["name"] == str(base) and registry.verify("v2") == []
    saved = json.loads(result.report_path.read_text())
    assert saved["decision"]["accepted"] and set(saved["models"]) == {"v1", "c1"}

    snapshot = {p: p.stat().st_mtime_ns for p in registry.root.rglob("*") if p.name != ".lock"}
    rejected = promote_best([worse], config, source="trial_2")
    assert not rejected.accepted and rejected.version is None and rejected.current == "v2"
    assert rejected.reason.startswith(f"rejected c1 ({worse}): val_loss ") and "does not beat v2's" in rejected.reason
    assert {p: p.stat().st_mtime_ns for p in registry.root.rglob("*") if p.name != ".lock"} == snapshot

    # A candidate the report of an earlier evaluation (the pipeline's evaluate stage) already
    # scored is not scored again, matched on what was scored: the same files (wherever they
    # are) on the same items; other items, or other files at the same path, do not match.
    report = json.loads(rejected.report_path.read_text())
    report["models"]["c1"]["metrics"]["val_loss"] = 0.5
    items = load_items(resolve_items_path(config.eval.mcq_path), max_items=24, seed=config.seed)
    assert read_scores(report, items, worse, "c1").metrics["val_loss"] == 0.5
    assert read_scores(report, items[:-1], worse, "c1") is None
    assert read_scores(report | {"items": report["items"] | {"sha256": "0" * 64}}, items, worse, "c1") is None
    kept = shutil.copytree(worse, tmp_path / "worse-files")
    tiny_model.save(tiny_model(seed=6), worse)  # the same path, other weights
    assert read_scores(report, items, worse, "c1") is None
    marked = tmp_path / "marked.json"
    marked.write_text(json.dumps(report))

    # The registry keeps each version's scores (scores/<version>/<key>.json): v1 was scored
    # once, v2 took its own from its promotion, and the gate reads them instead of scoring
    # (v2's entry, edited here, is what the next promotion compares with).
    assert [len(list(registry.scores_dir(v).glob("*.json"))) for v in ("v1", "v2")] == [1, 1]
    (entry,) = registry.scores_dir("v2").glob("*.json")
    cached = json.loads(entry.read_text())
    entry.write_text(json.dumps(cached | {"metrics": cached["metrics"] | {"val_loss": 7.0}}))
    reused = promote_best([kept], config, source="trial_3", scored_report=marked)
    assert reused.accepted and reused.report["models"]["c1"]["metrics"]["val_loss"] == 0.5
    assert reused.report["models"]["v2"]["metrics"]["val_loss"] == 7.0
    # An entry is used only under the same key: the same files, items, data and scoring.
    scores = VersionScores(registry, config, items, validation=True)
    assert scores.get("v3").metrics["val_loss"] == 0.5  # cached at v3's promotion, from the report
    assert VersionScores(registry, config, items[:-1], validation=True).get("v3") is None
    assert VersionScores(registry, config, items, validation=False).get("v3") is None
    other_data = config.model_copy(update={"data": config.data.model_copy(update={"block_size": 32})})
    assert VersionScores(registry, other_data, items, validation=True).get("v3") is None
    other_scoring = config.model_copy(update={"eval": config.eval.model_copy(update={"length_norm": False})})
    assert VersionScores(registry, other_scoring, items, validation=True).get("v3") is None

