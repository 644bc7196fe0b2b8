"""Ray Tune sweeps: the search-space checks, and real sweeps of Ray Train trials on the
session's local cluster (ASHA stopping a hopeless trial, resume, total failure)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from raymed.config import load_config
from raymed.data.pipeline import build_datasets
from raymed.errors import RaymedError
from raymed.sweep import format_table, run_sweep, search_space


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tune.space={}", "the search space is empty"),
        ("tune.space={train.lr_peak: {loguniform: [1e-4, 1e-3]}}", r"train.lr_peak: no such config field \('lr_peak'\)"),
        ("tune.space={train: {choice: [1, 2]}}", "name a field inside the train section"),
        ("tune.space={train.lr: {loguniform: [0, 1e-3]}}", "loguniform needs low > 0"),
        ("tune.space={train.lr: {uniform: [1e-3, 1e-4]}}", "low < high"),
        ("tune.space={train.lr: {uniform: [1e-4, 1e-3], choice: [1e-4]}}", "exactly one distribution"),
        ("tune.space={train.lr: {normal: [0, 1]}}", "Input should be 'loguniform'"),
        ("tune.metric=accuracy", "tune.metric: Input should be 'val_loss'"),
    ],
)
def test_bad_search_spaces_are_refused_naming_the_cause(override, message):
    with pytest.raises(RaymedError, match=message):
        load_config("ci-tiny", [override])


def test_search_space_becomes_tune_distributions():
    from ray.tune.search.sample import Float, Integer

    space = search_space(load_config("ci-tiny"))
    assert isinstance(space["train.lr"], Float) and isinstance(space["train.warmup_steps"], Integer)
    assert space["train.lr"].lower == 1e-4 and space["train.lr"].upper == 3e-3


def test_optuna_search_without_optuna_says_how_to_get_it():
    pytest.importorskip("ray.tune.search.optuna")
    try:
        import optuna  # noqa: F401

        pytest.skip("optuna is installed")
    except ImportError:
        pass
    from raymed.sweep import _search_algorithm

    with pytest.raises(RaymedError, match="pip install optuna"):
        _search_algorithm(load_config("ci-tiny", ["tune.search=optuna"]))


def _sweep_config(tmp_path: Path, *overrides: str):
    corpus = tmp_path / "qa.jsonl"
    corpus.write_text("".join(
        json.dumps({"question": f"What does finding {i} suggest?", "answer": f"Finding {i} suggests anaemia."}) + "\n"
        for i in range(80)))
    return load_config("ci-tiny", [
        f"data.train_path={corpus}", "data.block_size=64", "data.val_fraction=0.1", f"storage_path={tmp_path}",
        "run_name=sweep", "train.num_workers=1", "train.max_steps=8", "train.eval_every=2",
        "train.warmup_steps=0", "tune.max_concurrent_trials=1", "tune.num_samples=1", *overrides])


@pytest.mark.slow
def test_asha_stops_a_hopeless_trial_and_the_best_checkpoint_survives(ray_cluster, default_assets, tmp_path):
    # A learning rate of 1e-7 barely moves the loss: ASHA must cut it at an early rung.
    config = _sweep_config(tmp_path, "tune.space={train.lr: {grid: [3.0e-3, 1.0e-7]}}",
                           "tune.grace_period=2", "tune.reduction_factor=2", "train.keep_checkpoints=1")
    datasets, _ = build_datasets(config)
    result = run_sweep(config, datasets)

    # Nothing stays reserved after the sweep: stopped and finished trials' worker groups
    # are released (a leak here starved later trials and hung the suite).
    import ray
    from ray.util.placement_group import placement_group_table

    job = ray.get_runtime_context().get_job_id()
    assert [pg for pid, pg in placement_group_table().items()
            if pid.endswith(job) and pg["state"] == "CREATED"] == []

    by_lr = {row.params["train.lr"]: row for row in result.rows}
    assert by_lr[3e-3].status == "finished" and by_lr[3e-3].steps == 8
    assert by_lr[1e-7].status == "stopped early" and by_lr[1e-7].steps < 8
    assert result.best is by_lr[3e-3]
    best = Path(result.best.best_checkpoint)
    assert json.loads((best / "trainer_state.json").read_text())["step"] == result.best.best_step
    AutoModelForCausalLM.from_pretrained(best)  # the best checkpoint, kept and loadable

    with (result.directory / "results.csv").open() as table:
        assert sorted(float(r["train.lr"]) for r in csv.DictReader(table)) == [1e-7, 3e-3]
    assert (result.directory / "curves.png").stat().st_size > 10_000
    assert json.loads((result.directory / "best.json").read_text())["trial"] == result.best.trial
    table = format_table(config, result)
    assert "stopped early" in table and f"*{result.best.trial}" in table

    # Resuming a finished sweep re-runs nothing: the trials' step logs do not grow.
    logs = sorted((result.directory / "trials").glob("*/logs/metrics.jsonl"))
    lengths = [len(p.read_text().splitlines()) for p in logs]
    again = run_sweep(config, datasets, resume=True)
    assert [len(p.read_text().splitlines()) for p in logs] == lengths
    assert {r.trial for r in again.rows} == {r.trial for r in result.rows}

    with pytest.raises(RaymedError, match="a sweep already exists .* add --resume"):
        run_sweep(config, datasets)


@pytest.mark.slow
def test_a_sweep_whose_every_trial_fails_names_the_errors(ray_cluster, default_assets, tmp_path):
    # Every sample asks for blocks longer than the model's context: each trial fails.
    config = _sweep_config(tmp_path, "tune.space={data.block_size: {grid: [512, 1024]}}")
    datasets, _ = build_datasets(config)
    with pytest.raises(RaymedError, match="every trial failed.*block_size 512 exceeds the model's context"):
        run_sweep(config, datasets)


def test_resume_without_a_sweep_is_refused(ray_cluster, tmp_path):
    with pytest.raises(RaymedError, match="no sweep to resume"):
        run_sweep(_sweep_config(tmp_path), datasets={}, resume=True)


@pytest.mark.slow
def test_raymed_tune_hands_the_best_checkpoint_to_the_promotion_gate(ray_cluster, default_assets, tmp_path, capsys):
    from raymed.cli import main
    from raymed.registry import Registry

    config = _sweep_config(tmp_path, "train.max_steps=2", "tune.space={train.lr: {grid: [3.0e-3]}}",
                           "eval.max_items=8")
    overrides = [f"data.train_path={config.data.train_path}", "data.block_size=64", "data.val_fraction=0.1",
                 f"storage_path={tmp_path}", "run_name=sweep", "train.num_workers=1", "train.max_steps=2",
                 "train.eval_every=2", "train.warmup_steps=0", "tune.num_samples=1",
                 "tune.space={train.lr: {grid: [3.0e-3]}}", "eval.max_items=8"]
    assert main(["tune", "--config", "ci-tiny", *(a for o in overrides for a in ("--set", o))]) == 0
    printed = capsys.readouterr().out
    assert "best trial" in printed and "current: v1" in printed
    registry = Registry.for_config(config)
    manifest = registry.manifest(registry.current())
    assert "sweep/tune/" in json.dumps(manifest["source"])
