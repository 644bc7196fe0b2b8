"""Which BM25 library serves the knowledge index better: bm25s (what raymed uses) against
tantivy, on the same passages cut into the same terms, in one run.

    raymed index build && python bench/index_engines.py     # prints one JSON object

Both index every passage of the built default index (read back from its shards), each
passage's terms from `raymed.index.passages.terms` (tantivy gets them pre-cut, joined by
spaces, with its whitespace tokenizer, so codes such as `e11.9` stay whole in both). Each
engine is timed on indexing alone (one thread), on its size on disk, on recall@1/@5 of every
eval item's question, and on the mean latency of one search. Both use their own BM25
defaults (bm25s: Lucene's formula, k1 1.5, b 0.75; tantivy: k1 1.2, b 0.75).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from raymed.assets.cache import default_cache_dir
from raymed.config import load_config
from raymed.eval import load_items, resolve_items_path
from raymed.index import passages
from raymed.index.build import PASSAGES_FILE, index_rel
from raymed.index.evaluate import recall

K = 5


def _all_passages(directory: Path) -> list[dict]:
    rows = []
    for shard in sorted(directory.glob("shard-*")):
        with open(shard / PASSAGES_FILE, encoding="utf-8") as lines:
            rows += [json.loads(line) for line in lines]
    return rows


def _size_mb(directory: Path) -> float:
    return round(sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) / 1e6, 1)


def _bm25s(documents: list[list[str]], rows: list[dict], out: Path):
    import bm25s

    vocabulary = {term: i for i, term in enumerate(sorted({t for d in documents for t in d}))}
    started = time.perf_counter()
    engine = bm25s.BM25()
    engine.index(([[vocabulary[t] for t in d] for d in documents], vocabulary), show_progress=False)
    build_s = time.perf_counter() - started
    engine.save(str(out), show_progress=False)

    def search(query: str) -> list[str]:
        ids = [vocabulary[t] for t in passages.terms(query) if t in vocabulary]
        if not ids:
            return []
        scores = engine.get_scores_from_ids(ids)
        top = np.argsort(-scores, kind="stable")[:K]
        return [rows[i]["id"] for i in top if scores[i] > 0]

    return build_s, search


def _tantivy(documents: list[list[str]], rows: list[dict], out: Path):
    import tantivy

    builder = tantivy.SchemaBuilder()
    builder.add_text_field("body", tokenizer_name="whitespace")
    builder.add_integer_field("row", stored=True)
    schema = builder.build()
    index = tantivy.Index(schema, path=str(out))
    started = time.perf_counter()
    writer = index.writer(heap_size=256_000_000, num_threads=1)
    for row, terms in enumerate(documents):
        writer.add_document(tantivy.Document(body=" ".join(terms), row=row))
    writer.commit()
    writer.wait_merging_threads()
    build_s = time.perf_counter() - started
    index.reload()
    searcher = index.searcher()

    def search(query: str) -> list[str]:
        terms = sorted(set(passages.terms(query)))
        if not terms:
            return []
        clauses = [(tantivy.Occur.Should, tantivy.Query.term_query(schema, "body", t)) for t in terms]
        hits = searcher.search(tantivy.Query.boolean_query(clauses), K).hits
        return [rows[searcher.doc(address)["row"][0]]["id"] for _, address in hits]

    return build_s, search


def _measure(name: str, make, documents, rows, items, work: Path) -> dict:
    out = work / name
    out.mkdir()
    build_s, search = make(documents, rows, out)
    questions = [item["question"] for item in items]
    started = time.perf_counter()
    found = [[{"id": i} for i in search(q)] for q in questions]
    search_ms = 1000 * (time.perf_counter() - started) / len(questions)
    return {"build_s": round(build_s, 2), "size_mb": _size_mb(out), "search_ms_mean": round(search_ms, 2),
            "recall@1": recall(items, found, 1)["all"], "recall@5": recall(items, found, 5)["all"]}


def main() -> dict:
    config = load_config(None, [])
    rows = _all_passages(default_cache_dir() / index_rel(config.index.name))
    documents = [passages.terms(f"{r['title']} {r['text']}") for r in rows]
    items = load_items(resolve_items_path(config.eval.mcq_path))
    with tempfile.TemporaryDirectory() as work:
        engines = {name: _measure(name, make, documents, rows, items, Path(work))
                   for name, make in (("bm25s", _bm25s), ("tantivy", _tantivy))}
    base, other = engines["bm25s"], engines["tantivy"]
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "passages": len(rows), "items": len(items),
        "engines": engines,
        "tantivy_vs_bm25s": {"build_time": round(other["build_s"] / base["build_s"], 2),
                             "search_time": round(other["search_ms_mean"] / base["search_ms_mean"], 2),
                             "size": round(other["size_mb"] / base["size_mb"], 2)},
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
