"""Packing tokenized examples into fixed-length blocks.

Examples are laid end to end, greedily in order; an example that does not fit in what is
left of the block starts a new block, and the rest of the old one is padding (label
IGNORE_INDEX). `position_ids` restart at 0 for each example, which is what Hugging Face
models use to keep examples apart with variable-length attention (flash-attention
kernels); with eager/SDPA attention a token may still attend to earlier examples in the
same block — the usual trade-off of packing, documented rather than hidden. Loss never
crosses examples: labels are per-example, each example's first token is unlabelled (it
would be predicted from the previous example's last token), and padding is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from raymed.data.records import IGNORE_INDEX


def pack(
    examples: Iterable[tuple[list[int], list[int]]], block_size: int, pad_id: int
) -> Iterator[dict[str, list[int]]]:
    """Blocks of `input_ids`, `labels`, `position_ids` (and `real_tokens`, the count of
    non-padding tokens) from (input_ids, labels) examples no longer than block_size."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example_ids, example_labels in examples:
        if len(example_ids) > block_size:
            raise ValueError(f"example of {len(example_ids)} tokens exceeds block_size {block_size}")
        if len(ids) + len(example_ids) > block_size:
            yield _block(ids, labels, positions, block_size, pad_id)
            ids, labels, positions = [], [], []
        ids += example_ids
        labels += [IGNORE_INDEX, *example_labels[1:]]
        positions += range(len(example_ids))
    if ids:
        yield _block(ids, labels, positions, block_size, pad_id)


def _block(ids, labels, positions, block_size, pad_id) -> dict[str, list[int]]:
    pad = block_size - len(ids)
    return {
        "input_ids": ids + [pad_id] * pad,
        "labels": labels + [IGNORE_INDEX] * pad,
        "position_ids": positions + [0] * pad,
        "real_tokens": len(ids),
    }
