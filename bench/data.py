"""Benchmark the data stage: tokens/s of the Ray Data pipeline (read → tokenize on an
actor pool → count → sort → pack) against a plain single-process loop doing the same
rendering, tokenization and packing (the baseline), on the default corpus.

    python bench/data.py [--actors 2] [--block-size 512]     # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import ray
from transformers import AutoTokenizer

from raymed.assets import resolve_corpus, resolve_pretrained
from raymed.config import load_config
from raymed.data.pack import pack
from raymed.data.pipeline import build_datasets
from raymed.data.records import BadRecord, render, to_messages, tokenize


def baseline(train_path: str, tokenizer_path: str, block_size: int) -> tuple[int, float]:
    """Real tokens packed, and seconds, for a single-process loop over the train file."""
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    examples = []
    with open(train_path, encoding="utf-8") as f:
        for line in f:
            try:
                ids, labels = tokenize(tokenizer, *render(tokenizer, to_messages(json.loads(line), "messages")))
            except BadRecord:
                continue
            if len(ids) <= block_size:
                examples.append((ids, labels))
    tokens = sum(b["real_tokens"] for b in pack(examples, block_size, tokenizer.eos_token_id))
    return tokens, time.perf_counter() - start


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=512)
    args = parser.parse_args()
    config = load_config("cpu-demo", [f"data.tokenizer_actors={args.actors}",
                                      f"data.block_size={args.block_size}"])
    train_path, _ = resolve_corpus(config.data.train_path, None)
    base_tokens, base_s = baseline(train_path, resolve_pretrained(config.model.name), args.block_size)

    ray.init(num_cpus=max(2, args.actors + 1), include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    _, stats = build_datasets(config)
    pipeline_s = time.perf_counter() - start
    ray.shutdown()
    pipeline_tokens = sum(stats.tokens.values())
    return {
        "benchmark": "data",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "records": stats.rows_read,
        "block_size": args.block_size,
        "tokenizer_actors": args.actors,
        "pipeline": {"tokens": pipeline_tokens, "seconds": round(pipeline_s, 1),
                     "tokens_per_s": round(pipeline_tokens / pipeline_s)},
        "baseline_single_process": {"tokens": base_tokens, "seconds": round(base_s, 1),
                                    "tokens_per_s": round(base_tokens / base_s)},
        "ratio": round((pipeline_tokens / pipeline_s) / (base_tokens / base_s), 2),
        "packing_efficiency": round(stats.packing_efficiency, 3),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
