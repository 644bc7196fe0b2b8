"""Building the knowledge index with Ray Data, saved like every asset (staging dir, rename,
manifest last; raymed.assets.cache), so an interrupted build leaves the previous index.

    sources ──flat_map──▶ passages ──(shard = crc32(id) mod shards)──▶ groupby shard
            ──map_groups──▶ one BM25 index per shard (bm25s), written into the staging dir

Layout of `RAYMED_CACHE/index/<name>/`: `index.json` (what was built), and per shard
`shard-<n>/` with bm25s's arrays, its vocabulary and `passages.jsonl` (row i is the
passage of document i). The manifest is `RAYMED_CACHE/.manifests/index-<name>.json`.
Same sources, same code → byte-identical files (passages sorted by id in every shard,
the vocabulary sorted).
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from pathlib import Path

import numpy as np

from raymed.assets import cache, corpus
from raymed.assets.cache import Asset, default_cache_dir, source_digest
from raymed.config import IndexConfig
from raymed.console import say
from raymed.errors import RaymedError
from raymed.index import passages

INDEX_DIR = "index"
INDEX_FILE = "index.json"
PASSAGES_FILE = "passages.jsonl"
FORMAT = 1


def index_rel(name: str) -> str:
    """The index's path relative to the cache root."""
    return f"{INDEX_DIR}/{name}"


def index_asset(settings: IndexConfig) -> Asset:
    """The cache entry for this index: its recipe follows the code, the sources and the documents."""
    recipe = "/".join([f"bm25-v{FORMAT}", source_digest(passages), source_digest(corpus), source_digest(_this()),
                       ",".join(settings.sources), str(settings.shards), _documents_digest(settings.documents)])
    return Asset(name=f"index-{settings.name}", outputs=(index_rel(settings.name),),
                 build=lambda staging, seed, progress: _build_into(staging, settings, progress),
                 recipe=recipe, progress_total=settings.shards, progress_unit="shard")


def build_index(settings: IndexConfig, cache_dir: Path | None = None, *, force: bool = False) -> dict:
    """Build the index unless a complete, current one is there (`force`: always); its manifest.
    The summary adds `seconds` (wall time of this call's build, absent when it was present)."""
    root = cache_dir or default_cache_dir()
    asset = index_asset(settings)
    problem = "forced" if force else cache.check(asset, root, 0, full=True)
    if problem is None:
        return {**cache.read_manifest(asset, root), "state": "present"}
    started = time.perf_counter()
    manifest = cache.build(asset, root, 0)
    return {**manifest, "state": "built", "seconds": round(time.perf_counter() - started, 2)}


def _build_into(staging: Path, settings: IndexConfig, progress) -> dict:
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
    out = staging / index_rel(settings.name)
    out.mkdir(parents=True)
    shards = (_passages(settings)
              .map(_with_shard, fn_kwargs={"shards": settings.shards})
              .groupby("shard")
              .map_groups(_write_shard, fn_kwargs={"out": str(out)}, batch_format="pyarrow",
                          compute=ray.data.TaskPoolStrategy(size=settings.workers)))
    summaries = []
    for row in shards.iter_rows():
        summaries.append({k: row[k] for k in ("shard", "passages", "terms")} | {"collections": json.loads(row["collections"])})
        progress(1)
    summaries.sort(key=lambda s: s["shard"])
    if len(summaries) != settings.shards:
        raise RaymedError(f"the index has {len(summaries)} non-empty shards of {settings.shards}: "
                          "too few passages for that many shards; lower index.shards")
    summary = {"format": FORMAT, "name": settings.name, "shards": summaries,
               "passages": sum(s["passages"] for s in summaries),
               "collections": _total(s["collections"] for s in summaries)}
    (out / INDEX_FILE).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def _passages(settings: IndexConfig):
    """Every passage (a Ray Dataset): the packaged sources, one read task each, and documents."""
    import ray

    from raymed.data.pipeline import read_records

    sources = ray.data.from_items([{"collection": s} for s in settings.sources],
                                  override_num_blocks=max(1, len(settings.sources)))
    dataset = sources.flat_map(passages.source_passages, compute=ray.data.TaskPoolStrategy(size=settings.workers))
    if settings.documents:
        documents = read_records(str(Path(settings.documents).expanduser())).flat_map(
            passages.document_passage, fn_kwargs={"origin": Path(settings.documents).name})
        dataset = dataset.union(_checked_documents(documents, settings.documents).drop_columns(["error"]))
    return dataset


def _checked_documents(documents, origin: str):
    """Readable documents; a build with bad rows fails, naming how many and why (nothing dropped silently)."""
    documents = documents.materialize()
    bad = documents.filter(lambda row: bool(row["error"]))
    reasons: dict[str, int] = {}
    for row in bad.iter_rows():
        reasons[row["error"]] = reasons.get(row["error"], 0) + 1
    if reasons:
        listed = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
        raise RaymedError(f"index.documents {origin}: {sum(reasons.values())} unreadable records ({listed}): "
                          "fix or remove them")
    return documents


def _with_shard(row: dict, shards: int) -> dict:
    return {**row, "shard": zlib.crc32(row["id"].encode()) % shards}


def _write_shard(table, out: str) -> dict:
    """map_groups: one shard's passages → its BM25 index on disk; a one-row summary."""
    import bm25s

    rows = _unique(sorted(table.drop_columns(["shard"]).to_pylist(), key=lambda r: (r["id"], r["text"])))
    shard = int(table["shard"][0].as_py())
    documents = [passages.terms(f"{r['title']} {r['text']}") for r in rows]
    vocabulary = {term: i for i, term in enumerate(sorted({t for d in documents for t in d}))}
    retriever = bm25s.BM25()
    retriever.index(([[vocabulary[t] for t in d] for d in documents], vocabulary), show_progress=False)
    directory = Path(out) / f"shard-{shard:03d}"
    retriever.save(str(directory), show_progress=False)
    with open(directory / PASSAGES_FILE, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    counts = _total([{r["collection"]: 1} for r in rows])
    return {"shard": np.array([shard]), "passages": np.array([len(rows)]), "terms": np.array([len(vocabulary)]),
            "collections": np.array([json.dumps(counts, sort_keys=True)])}


def _unique(rows: list[dict]) -> list[dict]:
    """Rows sorted by id, an exact repeat (a document given twice) kept once; two different
    passages with one id are an error (ids must be stable and unique)."""
    out: list[dict] = []
    for row in rows:
        if out and out[-1]["id"] == row["id"]:
            if out[-1] != row:
                raise RaymedError(f"two different passages share the id {row['id']!r}: every passage needs its own")
            continue
        out.append(row)
    return out


def _total(counts) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in counts:
        for key, n in part.items():
            total[key] = total.get(key, 0) + n
    return dict(sorted(total.items()))


def _documents_digest(documents: str | None) -> str:
    """Changes when any document file changes (local paths), so the index is rebuilt."""
    if not documents:
        return "no-documents"
    root = Path(documents).expanduser()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise RaymedError(f"index.documents {documents}: no such file or directory, or it is empty")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _this():
    import sys

    return sys.modules[__name__]


def index_stage(config) -> dict:
    """The pipeline's `index` stage (after `assets`): build the index when it is missing, stale
    or damaged, else a checksum check. Fingerprinted by its files, like the assets stage."""
    from raymed.stages import fingerprint

    manifest = build_index(config.index)
    say(f"[pipeline] index {config.index.name}: {manifest['state']} ({manifest['summary']['passages']} passages)")
    return {"index": str(default_cache_dir() / index_rel(config.index.name)), "digest": fingerprint(manifest["files"])}
