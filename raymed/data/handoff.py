"""The handoff to Ray Train workers: which DataConfig the trainer uses, and the batches
each worker iterates (`input_ids`, `labels`, `position_ids` as int64 tensors).

Streaming mode (default): Ray Data's streaming split hands blocks to whichever worker
asks first — fastest, but the batches a rank sees vary run to run.
Deterministic mode: every worker reads the whole ordered (seed-shuffled, materialized)
dataset and keeps its own slice of each global batch: rank r takes rows
[r·micro, (r+1)·micro) of global batch i. Same seed → same batches on the same rank in
the same order; a resumed run skips the global batches already consumed.

Validation is never split by Ray: every worker reads every block and keeps its slices
of each global batch as in deterministic mode, the last, incomplete one included, so a
validation pass scores every block exactly once (as `raymed eval` does).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch
from ray.data import ExecutionOptions
from ray.train import DataConfig

from raymed.data.pipeline import BLOCK_FIELDS

HANDOFF_FIELDS = (*BLOCK_FIELDS, "real_tokens")


def train_data_config(deterministic: bool) -> DataConfig:
    """The `dataset_config` for `TorchTrainer`. Its execution options are given, not left to
    Ray Train's defaults (which copy the driver's deprecated `exclude_resources` and warn)."""
    options = ExecutionOptions(preserve_order=deterministic)
    return DataConfig(datasets_to_split=[] if deterministic else ["train"], execution_options=options)


def worker_batches(key: str, micro_batch_size: int, *, deterministic: bool, skip_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Inside a Ray Train worker: this rank's batches of dataset `key` for one epoch."""
    import ray.train

    context = ray.train.get_context()
    return rank_batches(
        ray.train.get_dataset_shard(key), micro_batch_size,
        rank=context.get_world_rank(), world_size=context.get_world_size(),
        deterministic=deterministic, skip_batches=skip_batches,
    )


def validation_batches(micro_batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Inside a Ray Train worker: this rank's share of every validation block."""
    import ray.train

    context = ray.train.get_context()
    return rank_batches(ray.train.get_dataset_shard("validation"), micro_batch_size,
                        rank=context.get_world_rank(), world_size=context.get_world_size(),
                        deterministic=True, drop_last=False)


def rank_batches(source, micro_batch_size: int, *, rank: int, world_size: int, deterministic: bool,
                 skip_batches: int = 0, drop_last: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Batches for `rank` from a Dataset or DataIterator (this rank's shard when streaming,
    the whole dataset when deterministic). With `drop_last` (training) incomplete final
    batches are dropped so every rank takes the same number of steps; without it (validation)
    a rank whose slice of the last batch is empty gets nothing more."""
    width = micro_batch_size * world_size if deterministic else micro_batch_size
    lo = rank * micro_batch_size if deterministic else 0
    batches = source.iter_batches(batch_size=width, drop_last=drop_last, batch_format="numpy")
    for index, batch in enumerate(batches):
        if index < skip_batches:
            continue
        rows = {name: batch[name][lo : lo + micro_batch_size] for name in HANDOFF_FIELDS}
        if len(rows["input_ids"]):
            yield {name: torch.tensor(values) for name, values in rows.items()}  # a copy: Ray's arrays are read-only


def prefetched(batches: Iterator[dict[str, torch.Tensor]], *, pin_memory: bool, depth: int = 2) -> Iterator[dict[str, torch.Tensor]]:
    """`batches`, fetched `depth` ahead on a background thread (in page-locked memory when
    `pin_memory`, so the copy to the GPU runs asynchronously), so the training step does not
    wait on Ray Data. An error in the producer is raised in the consumer."""
    ready: queue.Queue = queue.Queue(maxsize=depth)

    def produce() -> None:
        try:
            for batch in batches:
                ready.put({k: v.pin_memory() if pin_memory else v for k, v in batch.items()})
            ready.put(_END)
        except BaseException as err:  # handed to the consumer, which raises it
            ready.put(err)

    threading.Thread(target=produce, name="raymed-prefetch", daemon=True).start()
    while True:
        item = ready.get()
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


_END = object()
