"""The Ray Data pipeline on a real local Ray cluster: formats, bad rows, packing,
determinism, and the handoff to Train workers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from raymed.config import load_config
from raymed.data.handoff import rank_batches
from raymed.data.records import IGNORE_INDEX
from raymed.data.pipeline import build_datasets
from raymed.errors import RaymedError

QA = [{"question": f"What does the code Q{i} mean?", "answer": f"Answer number {i} is about fever."}
      for i in range(40)]


@pytest.fixture(autouse=True)
def _cluster(ray_cluster, default_assets):
    pass


def _config(train_path, *overrides):
    return load_config("ci-tiny", [f"data.train_path={train_path}", "data.block_size=64",
                                   "data.val_fraction=0.2", *overrides])


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _blocks(ds):
    return [tuple(row["input_ids"].tolist()) for row in ds.take_all()]


def test_each_format_reads_the_same_records(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", QA)
    (tmp_path / "b.json").write_text(json.dumps(QA))
    pd.DataFrame(QA).to_parquet(tmp_path / "c.parquet")
    pd.DataFrame(QA).to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "dir").mkdir()
    _write_jsonl(tmp_path / "dir" / "part1.jsonl", QA[:15])
    _write_jsonl(tmp_path / "dir" / "part2.jsonl", QA[15:])
    reference = None
    for name in ("a.jsonl", "b.json", "c.parquet", "d.csv", "dir"):
        datasets, stats = build_datasets(_config(tmp_path / name))
        assert (stats.shape, stats.rows_read, stats.kept, stats.bad) == ("qa", 40, 40, {}), name
        blocks = sorted(_blocks(datasets["train"]) + _blocks(datasets["validation"]))
        reference = reference or blocks
        assert blocks == reference, name


def test_plain_text_paragraphs_train_on_every_token_but_never_across_examples(tmp_path):
    (tmp_path / "notes.txt").write_text("Fever is a raised body temperature.\n\nAnemia is a lack of red cells.\n")
    datasets, stats = build_datasets(_config(tmp_path / "notes.txt", "data.val_fraction=0.01"))
    assert (stats.shape, stats.kept) == ("text", 2)
    [block] = datasets["train"].take_all()
    real = block["real_tokens"]
    starts = block["position_ids"][:real] == 0
    assert starts.sum() == 2  # both paragraphs share the block
    # Each example's first token is unlabelled (the previous example's last token would
    # otherwise be trained to predict it); every other token trains.
    assert (block["labels"][:real][starts] == IGNORE_INDEX).all()
    assert (block["labels"][:real][~starts] == block["input_ids"][:real][~starts]).all()


def test_bad_rows_are_counted_by_reason_and_totals_add_up(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(r).encode() for r in QA[:10]] + [
        b'{"question": "unterminated',
        b'{"question": "caf\xe9?", "answer": "latin-1 bytes"}',
        json.dumps({"question": "no answer here"}).encode(),
        json.dumps({"question": "   ", "answer": "blank question"}).encode(),
        json.dumps({"question": "Q", "answer": "word " * 200}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    _, stats = build_datasets(_config(path, "data.shape=qa"))
    assert stats.bad == {"empty_text": 1, "longer_than_block": 1, "malformed_json": 1,
                         "missing_field": 1, "non_utf8": 1}
    assert stats.rows_read == stats.kept + sum(stats.bad.values()) == 15
    with pytest.raises(RaymedError, match="5 bad rows .*malformed_json: 1.*on_bad_row is fail"):
        build_datasets(_config(path, "data.shape=qa", "data.on_bad_row=fail"))


def test_unknown_roles_in_chats_are_bad_rows(tmp_path):
    chats = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}] * 5
    chats += [{"messages": [{"role": "wizard", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    _, stats = build_datasets(_config(_write_jsonl(tmp_path / "chat.jsonl", chats)))
    assert (stats.shape, stats.kept, stats.bad) == ("messages", 5, {"unknown_role": 1})


def test_packing_keeps_every_real_token_once(tmp_path):
    datasets, stats = build_datasets(_config(_write_jsonl(tmp_path / "qa.jsonl", QA)))
    assert sum(stats.tokens.values()) == sum(stats.example_lengths)
    for ds in datasets.values():
        for row in ds.take_all():
            real = row["real_tokens"]
            assert (row["labels"][real:] == -100).all()
            starts = int((row["position_ids"][:real] == 0).sum())
            assert starts >= 1
    assert 0 < stats.packing_efficiency <= 1


def test_validation_split_by_fraction_or_from_a_file(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", QA)
    _, stats = build_datasets(_config(path, "data.val_fraction=0.5"))
    assert 0 < stats.tokens["validation"] < sum(stats.tokens.values())
    val = _write_jsonl(tmp_path / "val.jsonl", QA[:3])
    datasets, stats = build_datasets(_config(path, f"data.validation_path={val}"))
    assert stats.kept == 43
    assert sum(int(r["real_tokens"]) for r in datasets["train"].take_all()) == stats.tokens["train"]
    val_examples = sum(int((r["position_ids"][: r["real_tokens"]] == 0).sum())
                       for r in datasets["validation"].take_all())
    assert val_examples == 3


def test_same_seed_same_blocks_other_seed_other_order(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", QA)
    first = _blocks(build_datasets(_config(path))[0]["train"])
    again = _blocks(build_datasets(_config(path))[0]["train"])
    other = _blocks(build_datasets(_config(path, "seed=1"))[0]["train"])
    assert first == again
    assert first != other


def test_no_usable_rows_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.jsonl"
    path.write_text("not json\n{also not\n")
    with pytest.raises(RaymedError, match="cannot tell|no record has|no training examples"):
        build_datasets(_config(path))


def test_unknown_format_is_rejected(tmp_path):
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(RaymedError, match="cannot tell the format"):
        build_datasets(_config(tmp_path / "data.xml"))


def test_deterministic_ranks_get_disjoint_batches_that_cover_the_data(tmp_path):
    datasets, _ = build_datasets(_config(_write_jsonl(tmp_path / "qa.jsonl", QA * 4)))
    train = datasets["train"]
    per_rank = [
        [b["input_ids"] for b in rank_batches(train, 2, rank=r, world_size=2, deterministic=True)]
        for r in (0, 1)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    rows = [tuple(row.tolist()) for batches in per_rank for b in batches for row in b]
    usable = (train.count() // 4) * 4
    assert sorted(rows) == sorted(_blocks(train)[:usable])
    again = [b["input_ids"] for b in rank_batches(train, 2, rank=1, world_size=2, deterministic=True)]
    assert all(np.array_equal(a, b) for a, b in zip(again, per_rank[1]))
    resumed = [b["input_ids"] for b in rank_batches(train, 2, rank=1, world_size=2, deterministic=True, skip_batches=1)]
    assert all(np.array_equal(a, b) for a, b in zip(resumed, per_rank[1][1:]))
    assert len(resumed) == len(per_rank[1]) - 1
