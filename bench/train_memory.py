"""Per-worker training state under `train.strategy: ddp` and `fsdp`, same model, data and
steps, in the same run, for the default model's architecture (SmolLM2-135M, built from its
config) and for one 4x its size.

    python bench/train_memory.py [--workers 2] [--steps 3] [--models default 4x] [--ddp-4x]

State is measured from the tensors each rank holds after a step (the local shards under
FSDP): parameters + gradients + AdamW state; also each worker's peak RSS (the whole
process: libraries, activations, gathered layers) and steady-state real tokens/s. The 4x
model runs under DDP only with --ddp-4x (it needs 16 bytes per parameter on every worker:
about 9 GB each); otherwise its DDP state is given as that computed figure, marked so.
Prints one JSON object; `fsdp_vs_ddp_state` is the ratio of the largest worker's state.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import ray
import torch

from raymed.assets import resolve_pretrained
from raymed.config import Config, load_config, with_values
from raymed.data.pipeline import build_datasets
from raymed.train import METRICS_FILE, WorkerLoop, fit, local_state_bytes, train_dir

ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                       "tie_word_embeddings", "hidden_act")
FOUR_TIMES = {"hidden_size": 1152, "intermediate_size": 3072, "num_attention_heads": 18, "num_key_value_heads": 6,
              "num_hidden_layers": 34}
"""Twice the width and a few more layers: 538M parameters, 4.0x the default's 134.5M."""
PROBE_FILE = "memory-rank{rank}.json"
BYTES_PER_PARAM_DDP = 16
"""fp32 parameter, gradient and AdamW's two moments, whole on every DDP worker."""


class MeasuredLoop(WorkerLoop):
    """The real training steps; validation and checkpoints left out (they would write
    gigabytes for the larger model). Records this rank's largest state and peak RSS."""

    def _apply_gradients(self):
        import ray.train

        held = local_state_bytes(self.params, self.optimizer)  # gradients exist until the step
        norm = super()._apply_gradients()
        held["optimizer"] = local_state_bytes(self.params, self.optimizer)["optimizer"]
        rank = ray.train.get_context().get_world_rank()
        path = Path(self.config.storage_path) / PROBE_FILE.format(rank=rank)
        previous = json.loads(path.read_text()) if path.exists() else {"state_bytes": 0}
        total = sum(held.values())
        record = {**held, "state_bytes": total} if total >= previous["state_bytes"] else previous
        record["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        path.write_text(json.dumps(record))
        return norm

    def _validate(self) -> dict[str, float]:
        return {}

    def _report_with_checkpoint(self, metrics: dict) -> None:
        import ray.train

        ray.train.report(metrics)


def measured_loop(config_data: dict) -> None:
    MeasuredLoop(Config.model_validate(config_data)).run()


def default_architecture() -> dict:
    config = json.loads((Path(resolve_pretrained("smollm2-135m-instruct")) / "config.json").read_text())
    return {k: config[k] for k in ARCHITECTURE_FIELDS if k in config}


def measure(config: Config, datasets) -> dict:
    with tempfile.TemporaryDirectory() as storage:
        run = config.model_copy(update={"storage_path": storage, "run_name": "bench"})
        started = time.perf_counter()
        fit(run, datasets, loop=measured_loop)
        wall = time.perf_counter() - started
        ranks = [json.loads(p.read_text()) for p in sorted(Path(storage).glob(PROBE_FILE.format(rank="*")))]
        last = json.loads((train_dir(run) / "logs" / METRICS_FILE).read_text().splitlines()[-1])
    gib = 2**30
    return {"state_gib_per_worker": [round(r["state_bytes"] / gib, 3) for r in ranks],
            "params_grads_optimizer_gib": [[round(r[k] / gib, 3) for k in ("params", "grads", "optimizer")]
                                           for r in ranks],
            "peak_rss_gib_per_worker": [round(r["peak_rss_bytes"] / gib, 2) for r in ranks],
            "tokens_per_s": round(last["tokens_per_s"], 1), "step_time_s": round(last["step_time_s"], 2),
            "wall_s": round(wall, 1), "state_bytes_max": max(r["state_bytes"] for r in ranks)}


def parameter_count(config: Config) -> int:
    from transformers import AutoModelForCausalLM

    from raymed.train import load_tokenizer
    from raymed.train.model import scratch_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(scratch_config(config.model, load_tokenizer(config.model)))
    return sum(p.numel() for p in model.parameters())


def compare(name: str, base: Config, args, datasets) -> dict:
    params = parameter_count(base)
    result = {"parameters": params}
    fsdp = measure(with_values(base, {"train.strategy": "fsdp"}), datasets)
    print(json.dumps({name: {"fsdp": fsdp}}), flush=True)  # kept if the run is cut short
    if name == "default" or args.ddp_4x:
        ddp = measure(base, datasets)
        ddp_state = ddp["state_bytes_max"]
    else:
        ddp = {"state_gib_per_worker": round(params * BYTES_PER_PARAM_DDP / 2**30, 3),
               "note": f"computed ({BYTES_PER_PARAM_DDP} bytes per parameter on every worker), not run: --ddp-4x"}
        ddp_state = params * BYTES_PER_PARAM_DDP
    result |= {"ddp": ddp, "fsdp": fsdp, "fsdp_vs_ddp_state": round(fsdp["state_bytes_max"] / ddp_state, 3)}
    if "tokens_per_s" in ddp:
        result["fsdp_vs_ddp_tokens_per_s"] = round(fsdp["tokens_per_s"] / ddp["tokens_per_s"], 3)
    return result


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--models", nargs="+", choices=["default", "4x"], default=["default", "4x"])
    parser.add_argument("--ddp-4x", action="store_true", help="also run the 4x model under DDP (~9 GB per worker)")
    args = parser.parse_args()
    ray.init(num_cpus=2 * args.workers + 2, include_dashboard=False, log_to_driver=False)
    architectures = {"default": default_architecture()}
    architectures["4x"] = architectures["default"] | FOUR_TIMES
    with tempfile.TemporaryDirectory() as corpus:
        configs = {name: bench_config(architectures[name], args, corpus_slice(Path(corpus))) for name in args.models}
        datasets, _ = build_datasets(next(iter(configs.values())))
        models = {name: compare(name, config, args, datasets) for name, config in configs.items()}
    return {
        "benchmark": "train_memory",
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "workers": args.workers, "steps": args.steps, "micro_batch_size": args.micro_batch_size,
        "block_size": args.block_size,
        "models": models,
    }


def corpus_slice(directory: Path, records: int = 400) -> Path:
    """The first records of the default corpus: enough batches for a few steps, tokenized fast."""
    from raymed.assets import default_cache_dir

    lines = (default_cache_dir() / "corpus" / "medical-v1" / "train.jsonl").read_text().splitlines()[:records]
    (directory / "train.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "train.jsonl"


def bench_config(architecture: dict, args, corpus: Path) -> Config:
    return load_config("ci-tiny", [
        f"model.architecture={json.dumps(architecture)}", f"data.train_path={corpus}", "data.val_fraction=0.05",
        f"data.block_size={args.block_size}", "data.deterministic=true", f"train.num_workers={args.workers}",
        f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", "train.warmup_steps=0",
        f"train.micro_batch_size={args.micro_batch_size}", "train.max_failures=0", "train.log_every=1"])


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
