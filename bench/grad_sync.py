"""DDP gradient sync under gradient accumulation: an all-reduce on every micro-batch (the
baseline, what raymed did before) against `no_sync` until the step's last micro-batch
(raymed's loop), same model, data and steps, in the same run.

    python bench/grad_sync.py [--config ci-tiny] [--steps 12] [--workers 2] [--grad-accum 4] [--set k=v ...]

Prints one JSON object: steady-state real tokens/s and step time of each (the first step
left out, as in training's own figures) and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import tempfile

import ray
import torch

from raymed.config import Config, load_config
from raymed.data.pipeline import build_datasets
from raymed.train import METRICS_FILE, WorkerLoop, fit, train_dir, train_loop_per_worker


class SyncEveryMicroBatch(WorkerLoop):
    """The baseline: DDP all-reduces the gradients after every micro-batch."""

    def _gradient_sync(self, last_micro_batch: bool):
        return contextlib.nullcontext()


def sync_every_micro_batch(config_data: dict) -> None:
    SyncEveryMicroBatch(Config.model_validate(config_data)).run()


def timed(config: Config, datasets, loop) -> dict:
    with tempfile.TemporaryDirectory() as storage:
        run = config.model_copy(update={"storage_path": storage, "run_name": "bench"})
        fit(run, datasets, loop=loop)
        last = json.loads((train_dir(run) / "logs" / METRICS_FILE).read_text().splitlines()[-1])
    return {k: round(last[k], 4) for k in ("tokens_per_s", "step_time_s")}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="ci-tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    config = load_config(args.config, [*args.overrides, "data.deterministic=true", "train.warmup_steps=0",
                                       f"train.num_workers={args.workers}", f"train.grad_accum={args.grad_accum}",
                                       f"train.max_steps={args.steps}", f"train.eval_every={args.steps}"])
    ray.init(num_cpus=2 * args.workers + 2, include_dashboard=False, log_to_driver=False)
    datasets, _ = build_datasets(config)
    baseline = timed(config, datasets, sync_every_micro_batch)
    print(json.dumps({"sync_every_micro_batch": baseline}), flush=True)  # kept if the run is cut short
    no_sync = timed(config, datasets, train_loop_per_worker)
    return {
        "benchmark": "grad_sync",
        "config": args.config,
        "machine": torch.cuda.get_device_name() if torch.cuda.is_available()
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "workers": args.workers, "grad_accum": args.grad_accum, "steps": args.steps,
        "micro_batch_size": config.train.micro_batch_size, "block_size": config.data.block_size,
        "sync_every_micro_batch": baseline,
        "no_sync_until_last": no_sync,
        "speedup_tokens_per_s": round(no_sync["tokens_per_s"] / baseline["tokens_per_s"], 3),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
