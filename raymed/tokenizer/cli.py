"""`raymed tokenizer train`: a byte-level BPE tokenizer trained on a corpus (raymed.cli adds it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_tokenizer_command(commands, add_config_args) -> None:
    """The `tokenizer` subcommand group, on the main parser's subcommands."""
    tokenizer = commands.add_parser("tokenizer", help="tokenizers trained on a corpus (train)")
    sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train", help="train a byte-level BPE tokenizer on a corpus into a Hugging Face tokenizer directory",
        description="Read the corpus with Ray Data (data.train_path, or --data: a cached corpus such as "
        "medical-v1, or any file, directory or URI the data stage reads), stream its text to a byte-level BPE "
        "trainer and save a tokenizer directory with ChatML special tokens (ids 0-3) and chat template. "
        "Use it with `--set model.tokenizer=DIR` (e.g. for model.init: scratch).")
    train.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the tokenizer directory goes")
    train.add_argument("--vocab-size", type=int, default=16000, metavar="N",
                       help="ids in all, the 256 bytes and 4 special tokens included (default 16000)")
    train.add_argument("--data", metavar="PATH", help="the corpus (default: data.train_path)")
    train.add_argument("--force", action="store_true", help="replace --out when it exists")
    add_config_args(train)
    train.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from raymed.assets import resolve_corpus
    from raymed.cli import _ray_init
    from raymed.config import load_config
    from raymed.tokenizer.train import train_tokenizer

    config = load_config(args.config, args.overrides)
    corpus, _ = resolve_corpus(args.data or config.data.train_path, None)
    _ray_init(config)
    summary = train_tokenizer(corpus, args.out, args.vocab_size, shape=config.data.shape, force=args.force)
    print(json.dumps(summary, indent=1))
    print(f"tokenizer written to {args.out}: use it with --set model.tokenizer={args.out}")
    return 0
