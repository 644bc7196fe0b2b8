"""`raymed data inspect`: what the data stage makes of a corpus, as text and optionally a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raymed.data.pipeline import DataStats

BAR_WIDTH = 40


def report(path: str, stats: DataStats, bins: int = 10) -> str:
    bad = ", ".join(f"{reason} {n}" for reason, n in stats.bad.items()) or "none"
    lines = [
        f"corpus:             {path}",
        f"shape:              {stats.shape}",
        f"rows read:          {stats.rows_read} = kept {stats.kept} + bad {sum(stats.bad.values())}",
        f"bad rows by reason: {bad}",
        "tokens:             " + ", ".join(f"{k} {v}" for k, v in stats.tokens.items()),
        f"blocks of {stats.block_size}:".ljust(20) + ", ".join(f"{k} {v}" for k, v in stats.blocks.items()),
        f"packing efficiency: {stats.packing_efficiency:.1%} (real tokens / block tokens)",
        "tokens per example:",
        *_histogram_lines(stats.example_lengths, bins),
    ]
    return "\n".join(lines)


def _histogram_lines(lengths: list[int], bins: int) -> list[str]:
    if not lengths:
        return ["  (no examples)"]
    counts, edges = np.histogram(lengths, bins=bins)
    peak = counts.max()
    return [
        f"  {int(lo):5d}-{int(hi):<5d} {'#' * round(BAR_WIDTH * n / peak):<{BAR_WIDTH}} {n}"
        for n, lo, hi in zip(counts, edges[:-1], edges[1:])
    ]


def plot(stats: DataStats, png: Path, bins: int = 30) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(stats.example_lengths, bins=bins, color="#3b7dd8")
    ax.axvline(stats.block_size, color="#c0392b", linestyle="--", label=f"block_size {stats.block_size}")
    ax.set(xlabel="tokens per example", ylabel="examples",
           title=f"{stats.kept} examples, packing efficiency {stats.packing_efficiency:.1%}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
