"""The handoff to real Ray Train workers (TorchTrainer, 2 CPU workers, gloo)."""

from __future__ import annotations

import json

import pytest
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raymed.config import load_config
from raymed.data.handoff import prefetched, rank_batches, train_data_config, worker_batches
from raymed.data.pipeline import build_datasets

pytestmark = pytest.mark.slow
MICRO = 2


def _record_batches(config: dict) -> None:
    """Worker loop: write this rank's batches (as token lists) to a JSON file."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    batches = list(worker_batches("train", MICRO, deterministic=config["deterministic"]))
    seen = [[row.tolist() for row in batch["input_ids"]] for batch in batches]
    shapes = {tuple(t.shape) for batch in batches for t in batch.values()}
    with open(f"{config['out']}/rank{rank}.json", "w") as f:
        json.dump({"batches": seen, "shapes": sorted(shapes)}, f)


@pytest.fixture(scope="module")
def train_dataset(ray_cluster, default_assets, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "qa.jsonl"
    path.write_text("".join(
        json.dumps({"question": f"What is finding {i}?", "answer": f"Finding {i} is a sign of disease."}) + "\n"
        for i in range(120)
    ))
    config = load_config("ci-tiny", [f"data.train_path={path}", "data.block_size=64"])
    return build_datasets(config)[0]["train"]


def _run(train, tmp_path, deterministic: bool) -> list[list]:
    TorchTrainer(
        _record_batches,
        train_loop_config={"out": str(tmp_path), "deterministic": deterministic},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        datasets={"train": train},
        dataset_config=train_data_config(deterministic),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="handoff"),
    ).fit()
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def _rows(result: dict) -> list[tuple]:
    return [tuple(row) for batch in result["batches"] for row in batch]


def test_deterministic_workers_get_their_planned_disjoint_batches(train_dataset, tmp_path):
    results = _run(train_dataset, tmp_path, deterministic=True)
    for rank, result in enumerate(results):
        planned = [[row.tolist() for row in b["input_ids"]]
                   for b in rank_batches(train_dataset, MICRO, rank=rank, world_size=2, deterministic=True)]
        assert result["batches"] == planned  # same seed → same batches on the same rank, in order
        assert result["shapes"] == [[MICRO], [MICRO, 64]]  # real_tokens; input_ids, labels, position_ids
    assert not set(_rows(results[0])) & set(_rows(results[1]))


def test_streaming_workers_get_disjoint_shards_that_cover_the_data(train_dataset, tmp_path):
    results = _run(train_dataset, tmp_path, deterministic=False)
    rows = _rows(results[0]) + _rows(results[1])
    everything = [tuple(r["input_ids"].tolist()) for r in train_dataset.take_all()]
    assert len(rows) == len(set(rows))
    assert set(rows) <= set(everything)
    assert len(everything) - len(rows) < 2 * MICRO  # only each shard's incomplete last batch is dropped


def test_prefetched_batches_keep_their_order_and_end():
    import torch

    batches = ({"input_ids": torch.full((2, 4), i)} for i in range(7))
    assert [int(b["input_ids"][0, 0]) for b in prefetched(batches, pin_memory=False, depth=2)] == list(range(7))


def test_prefetching_raises_the_producers_error_in_the_consumer():
    import torch

    def failing():
        yield {"input_ids": torch.zeros(1)}
        raise OSError("shard unreadable")

    stream = prefetched(failing(), pin_memory=False)
    next(stream)
    with pytest.raises(OSError, match="shard unreadable"):
        next(stream)
