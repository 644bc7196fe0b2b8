"""The knowledge index on real Ray Data: built deterministically and atomically, checked
against its manifest when opened, and searched by code, term and document."""

from __future__ import annotations

import json

import pytest

from raymed.config import IndexConfig
from raymed.errors import RaymedError
from raymed.index import IndexUnavailable, build_index, index_rel, open_index
from raymed.index.passages import terms
from raymed.index.search import MAX_QUERY_CHARS

DOCUMENTS = [{"question": "What is the Zorblatt manoeuvre?",
              "answer": "The Zorblatt manoeuvre is a fictional bedside test used in this test suite."},
             {"text": "Quillfeather syndrome is a made-up condition that only exists in raymed's tests."}]


def small_index(tmp_path, name="small", **fields) -> IndexConfig:
    documents = tmp_path / "docs.jsonl"
    documents.write_text("".join(json.dumps(d) + "\n" for d in DOCUMENTS))
    return IndexConfig(name=name, sources=["abbreviations"], documents=str(documents), shards=2, **fields)


def test_terms_keep_codes_whole_and_in_parts():
    found = terms("Which diagnosis is coded as E11.9 in ICD-10-CM, or HP:0001945?")
    assert {"e11.9", "e11", "9", "icd-10-cm", "hp:0001945", "0001945", "diagnosis"} <= set(found)
    assert "which" not in found and "is" not in found


def test_build_is_deterministic_and_finds_entries_and_documents(ray_cluster, tmp_path):
    settings = small_index(tmp_path)
    first = build_index(settings, tmp_path / "a")
    second = build_index(settings.model_copy(update={"workers": 2}), tmp_path / "b")
    assert first["state"] == second["state"] == "built"
    assert first["files"] == second["files"]  # same bytes (sha256 per file) whatever the worker count
    assert first["summary"]["collections"]["documents"] == 2
    assert first["summary"]["collections"]["abbreviations"] > 2000
    assert build_index(settings, tmp_path / "a")["state"] == "present"  # a rerun leaves it alone

    index = open_index(settings, tmp_path / "a")
    bid = index.search("What does the abbreviation 'BID' stand for in medicine?", 3)
    assert bid[0]["id"] == "abbreviations:BID"
    assert set(bid[0]) >= {"id", "source", "title", "text", "score"}
    document = index.search("Tell me about Quillfeather syndrome", 1)[0]
    assert document["collection"] == "documents" and "made-up condition" in document["text"]
    assert index.search("zzzqqq", 3) == []  # no term of the query is in the index


def test_interrupted_build_leaves_the_previous_index(ray_cluster, tmp_path):
    settings = small_index(tmp_path)
    cache = tmp_path / "cache"
    before = build_index(settings, cache)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(RaymedError, match="1 unreadable records"):  # fails mid-build, in the staging dir
        build_index(settings.model_copy(update={"documents": str(broken)}), cache, force=True)
    index = open_index(settings, cache)  # the previous index, intact and current
    assert index.summary == before["summary"]
    assert not list((cache / ".staging").iterdir())


def test_damaged_index_is_refused_with_the_build_command(ray_cluster, tmp_path):
    settings = small_index(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(IndexUnavailable, match=r"missing.*raymed index build"):
        open_index(settings, cache)
    build_index(settings, cache)
    passages = cache / index_rel(settings.name) / "shard-001" / "passages.jsonl"
    passages.write_bytes(passages.read_bytes()[:-100])
    with pytest.raises(IndexUnavailable, match=r"passages.jsonl is truncated.*raymed index build"):
        open_index(settings, cache)


def test_search_refuses_empty_or_oversized_queries(ray_cluster, tmp_path):
    settings = small_index(tmp_path)
    build_index(settings, tmp_path / "cache")
    index = open_index(settings, tmp_path / "cache")
    for query, k, message in [("   ", 3, "empty"), ("x" * (MAX_QUERY_CHARS + 1), 3, "at most"),
                              ("fever", 0, "k must be"), ("fever", 51, "k must be")]:
        with pytest.raises(ValueError, match=message):
            index.search(query, k)
