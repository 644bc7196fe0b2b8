"""A sweep whose driver is killed after its first trial finished resumes with
`--resume`: the finished trial is not re-run and the final results list every trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from corpora import signs_corpus

from raymed.config import load_config
from raymed.data.pipeline import build_datasets
from raymed.sweep import run_sweep, sweep_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_cluster, default_assets, tmp_path):
    corpus = signs_corpus(tmp_path)
    overrides = [f"data.train_path={corpus}", "data.block_size=64", "data.val_fraction=0.1",
                 f"storage_path={tmp_path}", "run_name=interrupted", "train.num_workers=1",
                 "train.max_steps=4", "train.eval_every=2", "train.warmup_steps=0",
                 "tune.space={train.lr: {grid: [3.0e-3, 1.0e-3]}}", "tune.scheduler=none",
                 "tune.num_samples=1", "tune.max_concurrent_trials=1"]
    command = [sys.executable, "-m", "raymed", "-v", "tune", "--config", "ci-tiny",  # -v: Tune's own output
               *(arg for o in overrides for arg in ("--set", o))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    driver = subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        for line in driver.stdout:  # a condition wait on Tune's own progress output
            if "completed after" in line:
                break
        else:
            pytest.fail(f"the sweep exited ({driver.wait()}) before a trial completed")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()

    config = load_config("ci-tiny", overrides)
    logs = sweep_dir(config) / "trials"
    finished = [p for p in logs.glob("*/logs/metrics.jsonl") if len(p.read_text().splitlines()) == 4]
    assert len(finished) == 1
    before = finished[0].read_text()

    datasets, _ = build_datasets(config)
    result = run_sweep(config, datasets, resume=True)
    assert finished[0].read_text() == before  # not re-run
    assert sorted(r.params["train.lr"] for r in result.rows) == [1e-3, 3e-3]
    assert all(r.status == "finished" and r.steps == 4 for r in result.rows)
