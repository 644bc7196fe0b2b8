"""One serving decode step by batch size: launched kernel by kernel from Python (eager)
against replayed as a CUDA graph (`serve.cuda_graphs`), in the same run, over the engine's
own KV-cache slots; plus the largest difference between the two steps' logits. Prints JSON.

    python bench/decode_step.py MODEL_DIR [--batch 1 8 32 64 128] [--prompt-tokens 300] [--steps 30]

Each step includes what the engine does around the model: the token and position upload
and reading every row's greedy token back. Without a GPU only the eager step is timed.
Each batch size also gets its memory-bandwidth bound, `bound_ms`: the bytes one step must
read (every weight once, and the keys and values of the tokens the rows hold) over the
bandwidth a large on-device copy reaches in the same run; `*_over_bound` is how many times
that bound each step takes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from raymed.config import ServeConfig
from raymed.serve.model_source import context_length, load_for_inference
from raymed.serve.slots import FIRST_COLUMNS, DecodeStep, SlotCache, cache_argument


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    model, _ = load_for_inference(args.model_dir, ServeConfig(num_gpus=1 if on_gpu else 0))
    limit = context_length(Path(args.model_dir))
    bandwidth, weights = copy_bandwidth(model.device), weight_bytes(model)
    held_tokens = args.prompt_tokens + 1 + args.steps // 2  # per row, the mean over the timed steps
    report = {"benchmark": "decode_step", "model": args.model_dir, "device": _device_name(),
              "dtype": str(model.dtype), "prompt_tokens": args.prompt_tokens, "steps": args.steps,
              "copy_bandwidth_gb_per_s": round(bandwidth / 1e9, 1), "weight_bytes": weights, "batches": []}
    for batch in args.batch:
        bound_ms = (weights + kv_bytes_per_token(model) * batch * held_tokens) / bandwidth * 1000
        result = {"batch": batch, "bound_ms": round(bound_ms, 3)}
        logits = {}
        for graphs in (False, True) if on_gpu else (False,):
            name = "graph" if graphs else "eager"
            slots, step = prefilled(model, batch, max(args.batch), args.prompt_tokens, limit, graphs)
            logits[name] = greedy_step(step, slots, batch, advance=False).float()  # also captures
            result[f"{name}_ms"] = round(time_steps(step, slots, batch, args.steps) * 1000, 3)
            result[f"{name}_tokens_per_s"] = round(batch / result[f"{name}_ms"] * 1000)
            result[f"{name}_over_bound"] = round(result[f"{name}_ms"] / bound_ms, 1)
            if graphs:
                result["graph_captured"] = step.graphs  # False: the capture failed, the step ran eagerly
            del slots, step
        if on_gpu:
            result["graph_speedup"] = round(result["eager_ms"] / result["graph_ms"], 2)
            result["max_logit_diff"] = float((logits["graph"] - logits["eager"]).abs().max())
            result["logit_scale"] = float(logits["eager"].abs().max())
        report["batches"].append(result)
        print(json.dumps(result), flush=True)
    print(json.dumps(report, indent=2))


@torch.inference_mode()
def prefilled(model, batch: int, rows: int, prompt_tokens: int, limit: int, graphs: bool):
    """Slots holding `batch` random prompts (seeded: both steps see the same ones)."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 100, (batch, prompt_tokens), device=model.device)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    slots = SlotCache(layers, rows=rows, columns=FIRST_COLUMNS, max_columns=limit + 1)
    slots.make_room(0, prompt_tokens)
    slots.place(0, layers, torch.ones(batch, prompt_tokens, dtype=torch.long))
    return slots, DecodeStep(model, cache_argument(model), slots, graphs)


@torch.inference_mode()
def greedy_step(step: DecodeStep, slots: SlotCache, batch: int, advance: bool = True) -> torch.Tensor:
    position = slots.end  # every row's prompt is prompt_tokens long: position == column
    logits = step.run([7] * batch, [position] * batch)
    logits.argmax(dim=-1).tolist()  # the engine reads every row's token each step
    if advance:
        slots.end += 1
    return logits


def time_steps(step: DecodeStep, slots: SlotCache, batch: int, steps: int) -> float:
    """Seconds per decode step, averaged over `steps`."""
    started = time.perf_counter()
    for _ in range(steps):
        greedy_step(step, slots, batch)
    return (time.perf_counter() - started) / steps


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second one large copy on `device` moves (each byte read and written)."""
    size = (1 << 30) if device.type == "cuda" else (256 << 20)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up: pages touched, kernels loaded
    _synchronize(device)
    repeats = 10
    started = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    _synchronize(device)
    return 2 * size * repeats / (time.perf_counter() - started)


def weight_bytes(model) -> int:
    """The bytes of weights a decode step reads: all of them (each tied tensor once), but
    of an untied input embedding only the rows looked up, left out here."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    if embedding is not model.get_output_embeddings().weight:
        total -= embedding.numel() * embedding.element_size()
    return total


def kv_bytes_per_token(model) -> int:
    """The key and value bytes one held token adds to what each step reads, over all layers."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * model.dtype.itemsize


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
