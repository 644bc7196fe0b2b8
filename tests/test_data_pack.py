"""pack.py: tokenized examples laid greedily, in order, into fixed-length blocks."""

from __future__ import annotations

import random

import pytest

from raymed.data.pack import pack
from raymed.data.records import IGNORE_INDEX

PAD = 0


# ---------------------------------------------------------------- helpers


def example(length: int, start: int = 1) -> tuple[list[int], list[int]]:
    """Ids start, start+1, ...; the first token is masked, the rest train."""
    ids = list(range(start, start + length))
    return ids, [IGNORE_INDEX] + ids[1:]


def random_example(rng: random.Random, max_len: int) -> tuple[list[int], list[int]]:
    length = rng.randint(1, max_len)
    ids = [rng.randint(1, 50_000) for _ in range(length)]  # never PAD
    labels = [token if rng.random() < 0.6 else IGNORE_INDEX for token in ids]
    return ids, labels


def real_part(block: dict, key: str) -> list[int]:
    return block[key][: block["real_tokens"]]


def padding_part(block: dict, key: str) -> list[int]:
    return block[key][block["real_tokens"]:]


def assert_packing_invariants(examples, blocks, block_size: int) -> None:
    # Every block has the same length and the padding is inert.
    for block in blocks:
        assert set(block) == {"input_ids", "labels", "position_ids", "real_tokens"}
        for key in ("input_ids", "labels", "position_ids"):
            assert len(block[key]) == block_size
        assert 0 < block["real_tokens"] <= block_size
        assert padding_part(block, "input_ids") == [PAD] * (block_size - block["real_tokens"])
        assert padding_part(block, "labels") == [IGNORE_INDEX] * (block_size - block["real_tokens"])
        assert padding_part(block, "position_ids") == [0] * (block_size - block["real_tokens"])

    # Every real token appears exactly once, in order, with its own label.
    assert [t for b in blocks for t in real_part(b, "input_ids")] == [t for ids, _ in examples for t in ids]
    # ... except each example's first token, which nothing in its own example predicts.
    assert [t for b in blocks for t in real_part(b, "labels")] == [
        t for _, labels in examples for t in [IGNORE_INDEX, *labels[1:]]
    ]
    # So no labelled token is predicted from another example's token.
    for block in blocks:
        for t in range(1, block_size):
            if block["labels"][t] != IGNORE_INDEX:
                assert block["position_ids"][t] != 0

    # Positions restart at 0 at each example and count up through it.
    assert [p for b in blocks for p in real_part(b, "position_ids")] == [
        p for ids, _ in examples for p in range(len(ids))
    ]

    # No example is split across blocks (each block starts a new example), and packing is
    # greedy: a block was closed only because the next example did not fit in it.
    assert all(b["position_ids"][0] == 0 for b in blocks)
    starts_of_blocks = _first_example_lengths(blocks)
    for block, next_len in zip(blocks, starts_of_blocks[1:]):
        assert block["real_tokens"] + next_len > block_size


def _first_example_lengths(blocks) -> list[int]:
    """Length of the first example in each block, read off its position ids."""
    lengths = []
    for block in blocks:
        positions = real_part(block, "position_ids")
        restart = next((i for i in range(1, len(positions)) if positions[i] == 0), len(positions))
        lengths.append(restart)
    return lengths


# ---------------------------------------------------------------- concrete cases


def test_small_examples_share_a_block_with_restarting_positions():
    blocks = list(pack([example(3, start=10), example(2, start=20)], block_size=8, pad_id=PAD))
    assert blocks == [
        {
            "input_ids": [10, 11, 12, 20, 21, PAD, PAD, PAD],
            "labels": [IGNORE_INDEX, 11, 12, IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
            "position_ids": [0, 1, 2, 0, 1, 0, 0, 0],
            "real_tokens": 5,
        }
    ]


def test_example_that_does_not_fit_starts_a_new_block():
    blocks = list(pack([example(3, start=10), example(3, start=20)], block_size=5, pad_id=PAD))
    assert [b["input_ids"] for b in blocks] == [[10, 11, 12, PAD, PAD], [20, 21, 22, PAD, PAD]]
    assert [b["position_ids"] for b in blocks] == [[0, 1, 2, 0, 0], [0, 1, 2, 0, 0]]
    assert [b["real_tokens"] for b in blocks] == [3, 3]


def test_example_of_exactly_block_size_fills_one_block():
    blocks = list(pack([example(6, start=1)], block_size=6, pad_id=PAD))
    assert len(blocks) == 1
    assert blocks[0]["input_ids"] == [1, 2, 3, 4, 5, 6]
    assert blocks[0]["position_ids"] == [0, 1, 2, 3, 4, 5]
    assert blocks[0]["real_tokens"] == 6


def test_examples_summing_to_block_size_fill_one_block_exactly():
    blocks = list(pack([example(2, 1), example(4, 10), example(3, 20)], block_size=6, pad_id=PAD))
    assert [b["input_ids"] for b in blocks] == [[1, 2, 10, 11, 12, 13], [20, 21, 22, PAD, PAD, PAD]]
    assert blocks[0]["position_ids"] == [0, 1, 0, 1, 2, 3]
    assert [b["real_tokens"] for b in blocks] == [6, 3]


def test_example_longer_than_block_size_raises():
    with pytest.raises(ValueError, match="exceeds block_size"):
        list(pack([example(2), example(7)], block_size=6, pad_id=PAD))


def test_empty_input_yields_no_blocks():
    assert list(pack([], block_size=8, pad_id=PAD)) == []
    assert list(pack(iter([]), block_size=8, pad_id=PAD)) == []


def test_pad_id_is_used_for_padding():
    (block,) = pack([example(1, start=5)], block_size=3, pad_id=99)
    assert block["input_ids"] == [5, 99, 99]


def test_examples_are_not_mutated():
    examples = [example(3, 1), example(3, 10)]
    before = [(list(i), list(l)) for i, l in examples]
    list(pack(examples, block_size=4, pad_id=PAD))
    assert examples == before


# ---------------------------------------------------------------- randomized (seeded)


@pytest.mark.parametrize("seed", range(300))
def test_random_examples_pack_losslessly(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 3, 8, 16, 64])
    examples = [random_example(rng, block_size) for _ in range(rng.randint(0, 40))]
    blocks = list(pack(iter(examples), block_size=block_size, pad_id=PAD))

    assert_packing_invariants(examples, blocks, block_size)
    assert sum(b["real_tokens"] for b in blocks) == sum(len(ids) for ids, _ in examples)
    assert (len(blocks) == 0) == (len(examples) == 0)


def test_text_examples_never_train_across_their_boundary():
    # Plain text labels every token; packed, the first token of each example is unlabelled,
    # or the previous example's last token would be trained to predict it.
    texts = [([5, 6, 7], [5, 6, 7]), ([8, 9], [8, 9]), ([10, 11, 12], [10, 11, 12])]
    (block,) = pack(texts, 16, PAD)
    assert block["labels"][:8] == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX, 11, 12]
