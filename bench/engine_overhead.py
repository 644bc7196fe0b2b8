"""The serving engine's host time per decode step: the wall time between two decode steps
of `BatchingEngine` minus the model forward inside them, at each batch size, with a tiny
real model built in code (2-layer Llama, the default tokenizer's vocabulary; no Ray).
Prints JSON.

    python bench/engine_overhead.py [--batch 1 16 64] [--steps 40] [--baseline-tree DIR]

Every request streams greedy tokens with no end-of-sequence token, so each step is a
decode step over the whole batch once the prefills are done; only those steps count. The
forward is timed around the model's own `forward`, so what is left is the engine: building
the step's inputs, sampling, reading tokens back, detokenizing, stop checks and handing
events to the requests' streams; `sample_ms` is the part of it spent in the sampler (on a
CPU, a pass over the [batch, vocabulary] logits that a GPU would do). `--baseline-tree` runs the same measurement, in the same
run, against another checkout's engine (e.g. `git worktree add /tmp/base main`) and reports
the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import wraps
from pathlib import Path

import torch

PROMPT_TOKENS = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=40, help="decode steps measured per batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a replica uses serve.num_cpus)")
    parser.add_argument("--baseline-tree", type=Path, help="another checkout whose engine to measure too")
    parser.add_argument("--quiet", action="store_true", help="print only the final JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"benchmark": "engine_overhead", "engine": engine_source(), "machine": machine(),
              "threads": args.threads, "steps": args.steps, "batches": []}
    model, tokenizer = tiny_model()
    for batch in args.batch:
        result = asyncio.run(measure(model, tokenizer, batch, args.steps))
        report["batches"].append(result)
        if not args.quiet:
            print(json.dumps(result), flush=True)
    if args.baseline_tree:
        report["baseline"] = baseline(args)
        report["host_ms_ratio"] = {
            str(mine["batch"]): round(mine["host_ms"] / theirs["host_ms"], 3)
            for mine, theirs in zip(report["batches"], report["baseline"]["batches"])}
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


def tiny_model():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from raymed.assets import resolve_pretrained

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained("smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048)
    return LlamaForCausalLM(config).eval(), tokenizer


class Clock:
    """Wraps `owner.name` (its signature kept) and records each call's interval and shape."""

    def __init__(self, owner, name: str, shape):
        self.calls: list[tuple[float, float, tuple[int, ...]]] = []
        original = getattr(owner, name)

        @wraps(original)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            out = original(*args, **kwargs)
            self.calls.append((started, time.perf_counter(), shape(*args, **kwargs)))
            return out

        setattr(owner, name, timed)
        self._restore = lambda: setattr(owner, name, original)

    def restore(self) -> None:
        self._restore()

    def inside(self, start: float, end: float) -> list[tuple[float, float, tuple[int, ...]]]:
        return [call for call in self.calls if start <= call[0] < end]


async def measure(model, tokenizer, batch: int, steps: int) -> dict:
    """Run `batch` requests to the end; time the `steps` decode steps after the first few."""
    from raymed.serve.engine import BatchingEngine, SamplingParams
    from raymed.serve.sampling import BatchSampler

    step_ends: list[float] = []
    engine = BatchingEngine(model, tokenizer, max_batch_size=batch, context_length=2048, eos_token_ids=set(),
                            on_step=lambda: step_ends.append(time.perf_counter()))
    warmup = 8
    params = SamplingParams(max_tokens=warmup + steps + 4, temperature=0)
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(100, len(tokenizer) - 100, (batch, PROMPT_TOKENS), generator=generator).tolist()
    forward = Clock(model, "forward", lambda *args, **kwargs: tuple(kwargs["input_ids"].shape))
    sampler = Clock(BatchSampler, "sample", lambda self, logits, *rest: tuple(logits.shape))
    try:
        await asyncio.gather(*(drain(engine.generate(str(i), ids, params)) for i, ids in enumerate(prompts)))
    finally:
        forward.restore()
        sampler.restore()
    intervals = decode_intervals(step_ends, forward, sampler, batch)[warmup: warmup + steps]
    wall, model_s, sample_s = (statistics.mean(column) for column in zip(*intervals))
    hosts = sorted(total - inside for total, inside, _ in intervals)
    return {"batch": batch, "steps_measured": len(intervals), "step_ms": _ms(wall), "forward_ms": _ms(model_s),
            "host_ms": _ms(wall - model_s), "host_ms_p90": _ms(hosts[int(0.9 * len(hosts))]),
            "sample_ms": _ms(sample_s)}


def decode_intervals(step_ends, forward: Clock, sampler: Clock, batch) -> list[tuple[float, float, float]]:
    """(wall, forward, sampling) of each interval between two steps whose only forward was
    one decode step over all `batch` rows."""
    out = []
    for start, end in zip(step_ends, step_ends[1:]):
        calls = forward.inside(start, end)
        if len(calls) == 1 and calls[0][2] == (batch, 1):
            sampled = sum(e - b for b, e, _ in sampler.inside(start, end))
            out.append((end - start, calls[0][1] - calls[0][0], sampled))
    return out


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def drain(stream) -> None:
    async for _ in stream:
        pass


def baseline(args) -> dict:
    """This script's report for the engine in `args.baseline_tree`, run in a child process."""
    command = [sys.executable, __file__, "--quiet", "--steps", str(args.steps), "--threads", str(args.threads),
               "--batch", *map(str, args.batch)]
    env = {**os.environ, "PYTHONPATH": str(args.baseline_tree.resolve())}
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])


def engine_source() -> dict:
    """Which checkout's engine ran: its directory and commit."""
    import raymed

    root = Path(raymed.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"tree": str(root), "commit": commit}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_average_before": os.getloadavg(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


if __name__ == "__main__":
    main()
