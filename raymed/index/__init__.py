"""The knowledge index: medical passages from the packaged sources (and user documents),
built with Ray Data into a BM25 index per shard (bm25s), and searched by the Retriever
deployment (raymed.serve.retriever) and the grounded evaluation (raymed.index.evaluate).

    build_index(config.index) -> manifest        (raymed index build, jobs/index.py)
    open_index(config.index).search(query, k)    -> [{id, source, title, text, collection, score}]
"""

from raymed.index.build import build_index, index_rel
from raymed.index.search import Index, IndexUnavailable, open_index

__all__ = ["Index", "IndexUnavailable", "build_index", "index_rel", "open_index"]
