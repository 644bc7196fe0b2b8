"""How much compute ASHA saves: the same seeded sample of configurations swept twice, with
ASHA early stopping and without (every trial to max_steps).

    python bench/tune_asha.py [--config ci-tiny] [--samples 4] [--set k=v ...]

Prints one JSON object: trial-steps run with ASHA over trial-steps without it, the wall
time of each sweep, and whether both sweeps picked the same best configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time

import ray

from raymed.config import load_config
from raymed.data.pipeline import build_datasets
from raymed.sweep import run_sweep


def sweep(base: list[str], scheduler: str, storage: str, datasets: dict) -> dict:
    config = load_config(base[0], [*base[1:], f"tune.scheduler={scheduler}", f"storage_path={storage}"])
    started = time.perf_counter()
    result = run_sweep(config, datasets, progress=False)
    return {
        "wall_s": round(time.perf_counter() - started, 1),
        "trial_steps": sum(row.steps for row in result.rows),
        "stopped_early": sum(row.status == "stopped early" for row in result.rows),
        "best_params": result.best.params,
        "best_val_loss": round(result.best.best, 4),
        "trials": [{**row.params, "steps": row.steps, "best": row.best} for row in result.rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ci-tiny")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    base = [args.config, "run_name=asha-bench", "train.num_workers=1", "train.max_steps=12",
            "train.eval_every=4", "data.deterministic=true", f"tune.num_samples={args.samples}",
            "tune.max_concurrent_trials=1", "tune.grace_period=4", "tune.reduction_factor=2",
            *args.overrides]
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)  # as the tests do: Ray Data actors + a trial
    datasets, _ = build_datasets(load_config(base[0], base[1:]))
    with tempfile.TemporaryDirectory() as storage, contextlib.redirect_stdout(sys.stderr):  # Tune's tables
        asha = sweep(base, "asha", f"{storage}/asha", datasets)
        full = sweep(base, "none", f"{storage}/full", datasets)
    print(json.dumps({
        "benchmark": "tune_asha", "machine": f"{platform.machine()}, {ray.cluster_resources().get('CPU')} CPUs",
        "config": base, "asha": asha, "no_early_stopping": full,
        "trial_steps_ratio": round(asha["trial_steps"] / full["trial_steps"], 3),
        "wall_ratio": round(asha["wall_s"] / full["wall_s"], 3),
        "same_best": asha["best_params"] == full["best_params"],
    }, indent=2))


if __name__ == "__main__":
    main()
