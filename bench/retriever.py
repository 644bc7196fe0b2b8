"""Benchmark the knowledge index: recall@1/@5 of every eval item's question, and the
Retriever deployment's latency (p50/p99) with 16 queries in flight at once.

    raymed index build && python bench/retriever.py     # prints one JSON object

The queries are the eval items' questions (what the Gateway would send), through a Serve
handle to one Retriever replica, as the Gateway calls it.
"""

from __future__ import annotations

import asyncio
import json
import platform
import time

import numpy as np

from raymed.config import load_config
from raymed.eval import load_items, resolve_items_path
from raymed.index.evaluate import recall, retrieve_for

CONCURRENCY = 16
ROUNDS = 3


async def _latencies(handle, questions: list[str], k: int) -> list[float]:
    """Each query's latency, CONCURRENCY in flight at a time, every question ROUNDS times."""
    queue = [q for _ in range(ROUNDS) for q in questions]
    latencies: list[float] = []

    async def client():
        while queue:
            question = queue.pop()
            started = time.perf_counter()
            result = await handle.search.remote(question, k)
            assert result["error"] is None, result["error"]
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return latencies


def main() -> dict:
    import ray
    from ray import serve

    from raymed.serve.retriever import bind_retriever

    config = load_config(None, ["serve.grounding=true", "serve.retriever.max_replicas=1"])
    items = load_items(resolve_items_path(config.eval.mcq_path))
    started = time.perf_counter()
    retrieved = retrieve_for(items, config)
    in_process_s = time.perf_counter() - started
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    handle = serve.run(bind_retriever(config), name="retriever-bench", route_prefix=None)
    questions = [item["question"] for item in items]
    asyncio.run(_latencies(handle, questions[:CONCURRENCY], config.serve.grounding_k))  # warm-up
    latencies = np.array(asyncio.run(_latencies(handle, questions, config.serve.grounding_k))) * 1000
    serve.shutdown()
    return {
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "items": len(items),
        "recall@1": recall(items, retrieved, 1),
        "recall@5": recall(items, retrieved, 5),
        "in_process_search_ms_mean": round(1000 * in_process_s / len(items), 2),
        "serve_queries": len(latencies), "concurrency": CONCURRENCY, "k": config.serve.grounding_k,
        "serve_latency_ms": {"p50": round(float(np.percentile(latencies, 50)), 2),
                             "p99": round(float(np.percentile(latencies, 99)), 2)},
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
