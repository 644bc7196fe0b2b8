"""Benchmark tokenizers trained on the corpus against GPT-2's BPE and SmolLM2's tokenizer:

1. tokens per character on the validation split of medical-v1 (the text the chat template
   puts between special tokens: each turn's role and content);
2. validation bits per byte of a small from-scratch model (the ci-tiny architecture) trained
   the same steps on the same data with each tokenizer: (sum of the scored tokens' NLL in
   nats / ln 2) / (UTF-8 bytes of the scored text). Loss per token is not comparable across
   tokenizers (a token holds more or less text); loss per byte is. The scored tokens are the
   data stage's labelled ones (the answers and their end-of-turn token, which has no bytes);
   their bytes are summed from each token's byte string.

    python bench/tokenizer.py [--vocab 16000 32000] [--steps 200] [--micro-batch 2]     # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import ray
from transformers import AutoTokenizer

from raymed.assets import resolve_corpus, resolve_pretrained
from raymed.config import load_config
from raymed.data.pipeline import build_datasets
from raymed.tokenizer.train import corpus_texts, train_tokenizer
from raymed.train import fit

REFERENCES = {"gpt2": "gpt2", "smollm2": "smollm2-135m-instruct"}


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each id stands for: one per character of a byte-level BPE token (each
    character stands for one byte); 0 for special and added tokens, which are not text."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())
    not_text = set(tokenizer.added_tokens_encoder.values())
    lengths = np.zeros(len(tokenizer), dtype=np.int64)
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in not_text:
            continue
        if not set(token) <= alphabet:
            raise ValueError(f"{token!r} is not a byte-level BPE token: bytes per token are unknown")
        lengths[token_id] = len(token)
    return lengths


def tokens_per_char(tokenizer, texts: list[str]) -> dict:
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    chars = sum(len(t) for t in texts)
    return {"tokens_per_char": round(tokens / chars, 4), "bytes_per_token": round(sum(len(t.encode()) for t in texts)
                                                                                   / tokens, 3),
            "tokens": tokens, "vocab": len(tokenizer)}


def scored_tokens_and_bytes(validation, tokenizer) -> tuple[int, int]:
    """How many tokens validation scores (labels after the first position, not -100, as
    token_metrics counts them) and the UTF-8 bytes they stand for."""
    lengths = token_byte_lengths(tokenizer)
    count = size = 0
    for batch in validation.iter_batches(batch_format="numpy", batch_size=256):
        targets = batch["labels"][:, 1:]
        scored = targets[targets != -100]
        count += scored.size
        size += int(lengths[scored].sum())
    return count, size


def train_and_score(name: str, tokenizer_ref: str, work: Path, steps: int, block_size: int, micro_batch: int) -> dict:
    config = load_config("ci-tiny", [
        f"model.tokenizer={tokenizer_ref}", "data.train_path=medical-v1", f"data.block_size={block_size}",
        "data.deterministic=true", f"storage_path={work / 'runs'}", f"run_name=bench-{name}",
        "train.num_workers=1", f"train.max_steps={steps}", f"train.eval_every={steps}",
        f"train.micro_batch_size={micro_batch}", f"train.warmup_steps={max(1, steps // 10)}", "train.keep_checkpoints=1"])
    datasets, stats = build_datasets(config)
    started = time.perf_counter()
    result = fit(config, datasets)
    train_s = time.perf_counter() - started
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(tokenizer_ref))
    count, size = scored_tokens_and_bytes(datasets["validation"], tokenizer)
    val_loss = result.metrics["val_loss"]
    vocab = -(-len(tokenizer) // 64) * 64
    hidden = config.model.architecture["hidden_size"]
    return {"bits_per_byte": round(val_loss * count / math.log(2) / size, 4), "val_loss_per_token": round(val_loss, 4),
            "scored_tokens": count, "scored_bytes": size, "bad_rows": stats.bad,
            "train_tokens_per_step": block_size * config.train.micro_batch_size,
            "embedding_and_head_params": 2 * vocab * hidden, "fit_s": round(train_s, 1)}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vocab", type=int, nargs="+", default=[16000, 32000])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    train_path, validation_path = resolve_corpus("medical-v1", None)
    validation = list(corpus_texts(validation_path, "auto", Counter()))
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        tokenizers, training = dict(REFERENCES), {}
        for vocab in args.vocab:
            summary = train_tokenizer(train_path, work / f"medical-bpe-{vocab}", vocab)
            tokenizers[f"medical-bpe-{vocab}"] = str(work / f"medical-bpe-{vocab}")
            training[f"medical-bpe-{vocab}"] = {k: summary[k] for k in ("vocab_size", "records", "seconds")}
        density = {name: tokens_per_char(AutoTokenizer.from_pretrained(resolve_pretrained(ref)), validation)
                   for name, ref in tokenizers.items()}
        models = {name: train_and_score(name, ref, work, args.steps, args.block_size, args.micro_batch)
                  for name, ref in tokenizers.items()}
    ray.shutdown()
    return {
        "benchmark": "tokenizer",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "validation_records": len(validation),
        "tokenizer_training": training,
        "tokens_per_char": density,
        "scratch_model": {"architecture": "ci-tiny (llama, hidden 64, 2 layers)", "steps": args.steps,
                          "block_size": args.block_size, "micro_batch_size": args.micro_batch, "results": models},
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
