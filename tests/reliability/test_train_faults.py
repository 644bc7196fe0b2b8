"""Training under injected faults (real Ray, the ci-tiny model): a crash on every attempt
gives up after exactly max_failures retries with a clear error; a killed driver's run
resumes at the step of its last checkpoint when rerun with the same run name; a damaged
latest checkpoint stops the rerun with an error naming the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from corpora import signs_corpus

from raymed.config import load_config
from raymed.data.pipeline import build_datasets
from raymed.errors import RaymedError
from raymed.train import EVENTS_FILE, STATE_FILE, fit, train_dir

TESTS = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, *overrides: str):
    corpus = signs_corpus(tmp_path)
    return load_config("ci-tiny", [
        f"data.train_path={corpus}", "data.block_size=64", "data.val_fraction=0.1", "data.deterministic=true",
        f"storage_path={tmp_path}", "run_name=faults", "train.eval_every=2", "train.max_steps=6",
        "train.warmup_steps=1", *overrides])


@pytest.mark.slow
def test_the_same_crash_on_every_attempt_fails_after_exactly_max_failures_retries(
        ray_cluster, default_assets, tmp_path):
    from faults import crash_on_rank1_every_attempt

    config = _config(tmp_path, "train.max_failures=2")
    datasets, _ = build_datasets(config)
    with pytest.raises(RaymedError, match=r"training failed after 2 retries \(.*rank 1: .*\); checkpoints and logs: "):
        fit(config, datasets, loop=crash_on_rank1_every_attempt)
    assert (tmp_path / "attempts").read_text().splitlines() == ["attempt from step 0"] * 3


DRIVER = textwrap.dedent("""
    import sys
    import ray
    from faults import hang_after_checkpoint
    from raymed.config import load_config
    from raymed.data.pipeline import build_datasets
    from raymed.train import fit

    ray.init(num_cpus=4, include_dashboard=False)
    config = load_config("ci-tiny", sys.argv[1:])
    datasets, _ = build_datasets(config)
    fit(config, datasets, loop=hang_after_checkpoint)
""")


@pytest.mark.slow
def test_a_killed_driver_resumes_at_its_last_checkpoint_and_a_damaged_one_is_named(
        ray_cluster, default_assets, tmp_path):
    config = _config(tmp_path / "run", "train.max_failures=0")
    overrides = [f"{k}={v}" for k, v in {
        "data.train_path": config.data.train_path, "data.block_size": 64, "data.val_fraction": 0.1,
        "data.deterministic": "true", "storage_path": config.storage_path, "run_name": config.run_name,
        "train.eval_every": 2, "train.max_steps": 6, "train.warmup_steps": 1, "train.max_failures": 0}.items()]
    env = {**os.environ, "PYTHONPATH": f"{TESTS.parent}:{TESTS}", "RAY_ADDRESS": ""}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, *overrides], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for line in driver.stdout:  # a condition wait: the worker says when step 4 is registered
            if "CHECKPOINTED step 4" in line:
                break
        else:
            pytest.fail(f"the driver exited ({driver.wait()}) before checkpointing step 4")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()

    datasets, _ = build_datasets(config)
    result = fit(config, datasets)  # the same run name: resumes
    assert result.metrics["step"] == 6
    state = json.loads((Path(result.checkpoint.path) / STATE_FILE).read_text())
    assert state["attempt_started_at_step"] == 4
    assert "at step 4" in (train_dir(config) / "logs" / EVENTS_FILE).read_text()

    # Truncate the latest checkpoint's weights: a longer rerun must stop and name the file,
    # not restart from step 0.
    weights = Path(result.checkpoint.path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    longer = config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 8})})
    with pytest.raises(RaymedError, match=f"checkpoint file {weights} is unreadable"):
        fit(longer, datasets)
