"""A chat corpus with injected bad rows of every kind the data stage can meet (real Ray
Data): each bad row is counted under its reason, the totals add up to the rows read, and
the good rows are all kept and trained on. `on_bad_row=fail` names every reason."""

from __future__ import annotations

import json

import pytest

from raymed.config import load_config
from raymed.data.pipeline import build_datasets
from raymed.errors import RaymedError

GOOD = [{"messages": [{"role": "user", "content": f"What does code C{i} mean?"},
                      {"role": "assistant", "content": f"Code C{i} means fever of type {i}."}]} for i in range(30)]


def _chat(*turns) -> bytes:
    return json.dumps({"messages": [dict(zip(("role", "content"), turn)) for turn in turns]}).encode()


INJECTED = {
    # reason: the raw lines that must be counted under it
    "malformed_json": [b'{"messages": [{"role": "user"', b"not json at all"],
    "non_utf8": [b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'],
    "not_an_object": [b"[1, 2, 3]", b'"just a string"'],
    "missing_field": [b'{"text": "no messages here"}', _chat(("user", None), ("assistant", "x"))],
    "bad_field": [b'{"messages": ["hello"]}', _chat(("user", 42), ("assistant", "x"))],
    "empty_text": [_chat(("user", "   "), ("assistant", "x"))],
    "unknown_role": [_chat(("wizard", "Hi"), ("assistant", "Hello."))],
    "assistant_first": [_chat(("assistant", "I speak first."), ("user", "Hi"))],
    "no_answer": [_chat(("user", "Is anyone there?"))],
    "longer_than_block": [_chat(("user", "Describe it."), ("assistant", "fever " * 300))],
}


@pytest.fixture
def corpus(tmp_path):
    """Good rows with the bad ones spread among them."""
    lines = [json.dumps(row).encode() for row in GOOD]
    bad = [line for reason_lines in INJECTED.values() for line in reason_lines]
    for i, line in enumerate(bad):
        lines.insert(2 * i + 1, line)
    path = tmp_path / "chats.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _config(path, *overrides):
    return load_config("ci-tiny", [f"data.train_path={path}", "data.shape=messages", "data.block_size=128",
                                   "data.val_fraction=0.1", *overrides])


@pytest.mark.slow
def test_every_kind_of_bad_row_is_counted_and_the_totals_add_up(ray_cluster, default_assets, corpus):
    datasets, stats = build_datasets(_config(corpus))
    assert stats.bad == {reason: len(lines) for reason, lines in INJECTED.items()}
    assert stats.kept == len(GOOD)
    assert stats.rows_read == stats.kept + sum(stats.bad.values()) == len(GOOD) + sum(map(len, INJECTED.values()))
    # Every kept row reached the packed blocks whole: as many tokens as were tokenized.
    assert len(stats.example_lengths) == len(GOOD)
    packed = sum(int(row["real_tokens"]) for split in ("train", "validation") for row in datasets[split].take_all())
    assert packed == sum(stats.example_lengths)


@pytest.mark.slow
def test_on_bad_row_fail_names_every_reason(ray_cluster, default_assets, corpus):
    with pytest.raises(RaymedError) as err:
        build_datasets(_config(corpus, "data.on_bad_row=fail"))
    assert f"{sum(map(len, INJECTED.values()))} bad rows" in str(err.value)
    for reason, lines in INJECTED.items():
        assert f"{reason}: {len(lines)}" in str(err.value)
