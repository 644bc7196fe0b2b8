"""The default medical corpus and MCQ eval set (raymed.assets.corpus), built once per module."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

from raymed.assets import corpus

FILES = (f"{corpus.CORPUS_DIR}/train.jsonl", f"{corpus.CORPUS_DIR}/validation.jsonl", corpus.EVAL_FILE)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Seed-0 build: its root, stats and the progress counts it reported."""
    root = tmp_path_factory.mktemp("seed0")
    calls: list[int] = []
    stats = corpus.build_corpus(root, seed=0, progress=calls.append)
    return root, stats, calls


@pytest.fixture(scope="module")
def records(build):
    root = build[0]
    return {split: _read(root / corpus.CORPUS_DIR / f"{split}.jsonl") for split in corpus.CORPUS_SPLITS}


@pytest.fixture(scope="module")
def items(build):
    return _read(build[0] / corpus.EVAL_FILE)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _entities_by_source(rows: list[dict]) -> dict[str, set[str]]:
    out = defaultdict(set)
    for row in rows:
        out[row["source"]].add(row["entity"])
    return out


def test_stats_match_files_and_cover_every_source(build, records, items):
    stats = build[1]
    for split in corpus.CORPUS_SPLITS:
        counted = {s: sum(r["source"] == s for r in records[split]) for s in corpus.SOURCES}
        assert stats["records"][split] == counted
    for split in corpus.EVAL_SPLITS:
        counted = {s: sum(i["source"] == s and i["split"] == split for i in items) for s in corpus.SOURCES}
        assert stats["eval"][split] == counted
    for source in corpus.SOURCES:
        assert stats["records"]["train"][source] >= 1000
        assert stats["records"]["validation"][source] >= 50
        for split in corpus.EVAL_SPLITS:
            assert stats["eval"][split][source] == corpus.EVAL_ITEMS_PER_SPLIT


def test_progress_reports_every_record_and_item(build, records, items):
    calls = build[2]
    assert calls and all(n > 0 for n in calls)
    assert sum(calls) == sum(map(len, records.values())) + len(items)


def test_records_are_well_formed_chats_with_a_known_source(records):
    for rows in records.values():
        for row in rows:
            assert set(row) == {"messages", "source", "entity"}
            assert row["source"] in corpus.SOURCES
            assert isinstance(row["entity"], str) and row["entity"]
            assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
            for message in row["messages"]:
                assert set(message) == {"role", "content"}
                assert isinstance(message["content"], str) and message["content"].strip()


def test_train_and_validation_share_no_entity(records):
    train, validation = (_entities_by_source(records[s]) for s in corpus.CORPUS_SPLITS)
    for source in corpus.SOURCES:
        assert validation[source] and not train[source] & validation[source]


def test_drug_placeholders_and_back_references_are_dropped(records):
    for row in records["train"] + records["validation"]:
        if row["source"] == "drugs":
            answer = row["messages"][1]["content"]
            assert not re.search(rf"\b{corpus.DRUG_PLACEHOLDER}\b|: same\b", answer, re.IGNORECASE), answer


def test_eval_items_schema(items):
    for item in items:
        assert set(item) == {"question", "options", "answer", "source", "split", "entity"}
        assert item["source"] in corpus.SOURCES and item["split"] in corpus.EVAL_SPLITS
        assert isinstance(item["question"], str) and item["question"].strip()
        options = item["options"]
        assert len(options) == corpus.N_OPTIONS and all(isinstance(o, str) and o.strip() for o in options)
        assert len({o.lower() for o in options}) == corpus.N_OPTIONS
        assert isinstance(item["answer"], int) and 0 <= item["answer"] < corpus.N_OPTIONS


def test_answer_positions_are_shuffled(items):
    positions = {item["answer"] for item in items}
    assert positions == set(range(corpus.N_OPTIONS))


def test_heldout_entities_are_never_trained(records, items):
    seen = _entities_by_source(records["train"] + records["validation"])
    heldout = [i for i in items if i["split"] == "heldout"]
    assert heldout
    for item in heldout:
        assert item["entity"] not in seen[item["source"]]


def test_reworded_items_ask_trained_facts_in_new_wording(records, items):
    prompts, answers = defaultdict(set), defaultdict(list)
    for row in records["train"]:
        key = (row["source"], row["entity"])
        prompts[key].add(row["messages"][0]["content"])
        answers[key].append(row["messages"][1]["content"])
    reworded = [i for i in items if i["split"] == "reworded"]
    assert reworded
    for item in reworded:
        key = (item["source"], item["entity"])
        assert key in prompts, f"{key} is not in train"
        assert item["question"] not in prompts[key]
        correct = item["options"][item["answer"]]
        assert any(correct in answer for answer in answers[key])


def test_eval_wording_differs_from_every_training_template():
    train_questions = {q for questions, _ in corpus.TRAIN_TEMPLATES.values() for q in questions}
    for source in corpus.SOURCES:
        assert not set(corpus.MCQ_TEMPLATES[source]) & train_questions


def test_same_seed_same_bytes_other_seed_differs(build, tmp_path):
    root = build[0]
    again, other = tmp_path / "again", tmp_path / "other"
    corpus.build_corpus(again, seed=0)
    corpus.build_corpus(other, seed=1)
    for rel in FILES:
        assert (again / rel).read_bytes() == (root / rel).read_bytes(), rel
        assert (other / rel).read_bytes() != (root / rel).read_bytes(), rel
