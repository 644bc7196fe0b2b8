"""Training throughput with and without Ray Train, same model, data and steps.

    python bench/train_throughput.py [--config ci-tiny] [--steps 20] [--set k=v ...]

Prints one JSON object: real (non-padding) tokens/s and step time for a plain
single-process PyTorch loop over the same batches (the baseline) and for the Ray Train loop
with one worker (plus its data-wait fraction, and MFU on GPU). Both leave the first step
(compilation, cache warm-up) out of the timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import ray
import torch

from raymed.config import load_config, with_values
from raymed.data.handoff import prefetched, rank_batches
from raymed.data.pipeline import build_datasets
from raymed.train import METRICS_FILE, apply_scope, build_model, endless_epochs, fit, flops_per_token, load_tokenizer, train_dir


def plain_loop(config, train_ds, steps: int, profile: Path | None = None) -> dict:
    """The baseline: the same model and batches, no Ray Train, no DDP."""
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if config.train.use_gpu else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = apply_scope(build_model(config.model, load_tokenizer(config.model)), config.train).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.train.lr,
                                  fused=config.train.use_gpu)
    forward = torch.compile(model) if config.train.compile else model
    torch.backends.cuda.matmul.allow_tf32 = True
    batches = prefetched(endless_epochs(
        lambda: rank_batches(train_ds, config.train.micro_batch_size, rank=0, world_size=1, deterministic=True)),
        pin_memory=device.type == "cuda")
    pending = []  # the steps' losses still on the device

    def read() -> None:
        """One host transfer for the pending losses, as the Ray loop makes on its read steps."""
        torch.stack(pending).tolist()
        pending.clear()

    def step() -> int:
        batch = next(batches)
        real = int(batch.pop("real_tokens").sum())
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.train.bf16):
            loss = forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pending.append(loss.detach())
        if len(pending) == config.train.log_every:
            read()
        return real

    step()  # untimed, as in the Ray loop: the first step compiles and warms caches, and is read
    read()
    tokens, started = 0, time.perf_counter()
    for _ in range(steps - 1):
        tokens += step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    result = {"micro_batch_size": config.train.micro_batch_size, "tokens_per_s": round(tokens / elapsed),
              "step_time_s": round(elapsed / (steps - 1), 4)}
    if device.type == "cuda":
        flops = flops_per_token(model, config.data.block_size) * tokens / elapsed
        result["mfu"] = round(flops / (config.train.peak_tflops * 1e12), 4)
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if profile:
        write_profile(step, device, profile)
    return result


def write_profile(step, device, path: Path, steps: int = 3) -> None:
    """Where a step's time goes: torch.profiler's top operators over `steps` more steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))


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
    parser.add_argument("--profile", type=Path, metavar="TXT",
                        help="write torch.profiler's top operators over 3 more plain-loop steps")
    parser.add_argument("--plain-micro-batches", type=int, nargs="*", default=[],
                        help="also time the plain loop at these micro-batch sizes (the scaling curve)")
    args = parser.parse_args()
    config = load_config(args.config, [*args.overrides, "data.deterministic=true", "train.warmup_steps=0"])
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    datasets, _ = build_datasets(config)
    plain = plain_loop(config, datasets["train"], args.steps, args.profile)
    print(json.dumps({"plain_pytorch": plain}), flush=True)  # kept if the run is cut short
    with_ray = ray_loop(config, datasets, args.steps)
    scaling = [plain_loop(with_values(config, {"train.micro_batch_size": size}), datasets["train"], args.steps)
               for size in args.plain_micro_batches]
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
        "plain_by_micro_batch": scaling,
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
