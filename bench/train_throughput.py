"""Training throughput with and without Ray Train, same model, data and steps.

    python bench/train_throughput.py [--config ci-tiny] [--steps 20] [--set k=v ...]

Prints one JSON object: real (non-padding) tokens/s, step time and the fraction of time
spent waiting for data, for a plain single-process PyTorch loop (the baseline) and for
the Ray Train loop with one worker; MFU on GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import ray
import torch

from raymed.config import load_config
from raymed.data.handoff import rank_batches
from raymed.data.pipeline import build_datasets
from raymed.train import METRICS_FILE, apply_scope, build_model, fit, load_tokenizer, train_dir


def plain_loop(config, train_ds, steps: int) -> dict:
    """The baseline: the same model and batches, no Ray Train, no DDP."""
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if config.train.use_gpu else "cpu")
    model = apply_scope(build_model(config.model, load_tokenizer(config.model)), config.train).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.train.lr,
                                  fused=config.train.use_gpu)
    forward = torch.compile(model) if config.train.compile else model
    batches = rank_batches(train_ds, config.train.micro_batch_size, rank=0, world_size=1, deterministic=True)
    tokens, waited, started = 0, 0.0, time.perf_counter()
    for _ in range(steps):
        fetch = time.perf_counter()
        batch = next(batches)
        real = int(batch.pop("real_tokens").sum())
        batch = {k: v.to(device) for k, v in batch.items()}
        waited += time.perf_counter() - fetch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.train.bf16):
            forward(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += real
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": round(tokens / elapsed), "step_time_s": round(elapsed / steps, 4),
            "data_wait_frac": round(waited / elapsed, 4)}


def ray_loop(config, datasets, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as storage:
        run = config.model_copy(update={"storage_path": storage, "run_name": "bench"})
        run.train.num_workers, run.train.max_steps, run.train.eval_every = 1, steps, steps
        fit(run, datasets)
        last = json.loads((train_dir(run) / "logs" / METRICS_FILE).read_text().splitlines()[-1])
    return {k: round(last[k], 4) for k in ("tokens_per_s", "step_time_s", "data_wait_frac", "mfu") if k in last}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="ci-tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    config = load_config(args.config, [*args.overrides, "data.deterministic=true", "train.warmup_steps=0"])
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    datasets, _ = build_datasets(config)
    plain = plain_loop(config, datasets["train"], args.steps)
    with_ray = ray_loop(config, datasets, args.steps)
    return {
        "benchmark": "train_throughput",
        "config": args.config,
        "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "steps": args.steps,
        "micro_batch_size": config.train.micro_batch_size,
        "block_size": config.data.block_size,
        "plain_pytorch": plain,
        "ray_train_1_worker": with_ray,
        "ray_vs_plain_tokens_per_s": round(with_ray["tokens_per_s"] / plain["tokens_per_s"], 3),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
