"""Write a model directory with random weights in a preset's architecture (`init: scratch`),
for serving benchmarks on machines that lack the default model's weights.

    python bench/random_model.py --config smollm2-pretrain OUT_DIR [--set model.tokenizer=DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from raymed.config import load_config
from raymed.train import build_model, load_tokenizer, save_checkpoint_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--config", default="smollm2-pretrain")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.model)
    save_checkpoint_model(build_model(config.model, tokenizer), tokenizer, args.out)
    print(f"random {config.model.architecture['model_type']} model written to {args.out}")


if __name__ == "__main__":
    main()
