"""Searching a built knowledge index: `open_index(settings)` checks the index against its
manifest (sizes and checksums: a truncated or edited file is caught before it is trusted)
and loads every shard once; `Index.search(query, k)` returns the best `k` passages.

Shards are searched one by one and merged by BM25 score (ties broken by passage id, so a
query always gets the same answer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from raymed.assets import cache
from raymed.assets.cache import default_cache_dir
from raymed.config import IndexConfig
from raymed.errors import RaymedError
from raymed.index import passages
from raymed.index.build import INDEX_FILE, PASSAGES_FILE, index_asset, index_rel

MAX_QUERY_CHARS = 4000
"""A longer query is refused (BM25 cost grows with its terms; a question is far shorter)."""
MAX_K = 50


class IndexUnavailable(RaymedError):
    """The index is missing, stale or damaged: the message says how and names `raymed index build`."""


@dataclass(frozen=True)
class _Shard:
    bm25: object
    vocabulary: dict[str, int]
    passages: list[dict]


def open_index(settings: IndexConfig, cache_dir: Path | None = None) -> Index:
    """The index `settings.name` names, verified and loaded (IndexUnavailable when it cannot be)."""
    root = cache_dir or default_cache_dir()
    asset = index_asset(settings)
    manifest = cache.read_manifest(asset, root)
    if manifest is not None:  # an index built by other code or sources still answers (its manifest says which)
        asset = replace(asset, recipe=manifest.get("recipe"))
    problem = cache.check(asset, root, 0, full=True)
    if problem is not None:
        raise IndexUnavailable(f"knowledge index {settings.name!r} in {root / index_rel(settings.name)} is not "
                               f"usable ({problem}): run `raymed index build`")
    directory = root / index_rel(settings.name)
    try:
        summary = json.loads((directory / INDEX_FILE).read_text())
        shards = [_load_shard(directory / f"shard-{s['shard']:03d}") for s in summary["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise IndexUnavailable(f"knowledge index {settings.name!r} in {directory} cannot be read ({err}): "
                               "run `raymed index build --force`") from None
    return Index(settings.name, summary, shards)


def _load_shard(directory: Path) -> _Shard:
    import bm25s

    bm25 = bm25s.BM25.load(str(directory), mmap=False, allow_pickle=False)
    with open(directory / PASSAGES_FILE, encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines]
    if len(rows) != bm25.scores["num_docs"]:
        raise ValueError(f"{directory.name} has {len(rows)} passages for {bm25.scores['num_docs']} indexed documents")
    return _Shard(bm25, bm25.vocab_dict, rows)


class Index:
    """A loaded index: every shard's BM25 matrix and passages in memory."""

    def __init__(self, name: str, summary: dict, shards: list[_Shard]):
        self.name, self.summary, self.shards = name, summary, shards

    def search(self, query: str, k: int) -> list[dict]:
        """The top `k` passages for `query`, best first, each with its `score`; [] when no
        term of the query is in the index. ValueError for an empty or oversized query or a bad k."""
        check_query(query, k)
        hits = []
        for shard in self.shards:
            ids = [shard.vocabulary[t] for t in passages.terms(query) if t in shard.vocabulary and t != ""]
            if not ids:
                continue
            scores = shard.bm25.get_scores_from_ids(ids)
            top = np.argsort(-scores, kind="stable")[:k]
            hits += [(float(scores[i]), shard.passages[i]) for i in top if scores[i] > 0]
        hits.sort(key=lambda hit: (-hit[0], hit[1]["id"]))
        return [{**passage, "score": round(score, 4)} for score, passage in hits[:k]]


def check_query(query, k) -> None:
    """ValueError naming what is wrong with a search request (the Retriever's bad input)."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("the query is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise ValueError(f"the query must be at most {MAX_QUERY_CHARS} characters. Given: {len(query)}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an integer from 1 to {MAX_K}. Given: {k!r}")
