"""Training loops with injected faults, importable by Ray workers (tests/ is on their
PYTHONPATH). Each wraps the real loop; the fault is the only difference."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch


def crash_on_rank1_every_attempt(config_data: dict) -> None:
    """Rank 1 dies (os._exit) before its first step on every attempt; rank 0 appends one
    line per attempt to <storage_path>/attempts."""
    import ray.train

    from raymed.config import Config
    from raymed.train import WorkerLoop

    class Crashing(WorkerLoop):
        def _train_step(self, stream):
            rank = ray.train.get_context().get_world_rank()
            if rank == 0 and self.step == self.start_step:
                with (Path(config_data["storage_path"]) / "attempts").open("a") as attempts:
                    attempts.write(f"attempt from step {self.step}\n")
                torch.distributed.barrier()  # rank 0 has counted this attempt
            elif rank == 1:
                torch.distributed.barrier()
                os._exit(1)
            return super()._train_step(stream)

    Crashing(Config.model_validate(config_data)).run()


def hang_after_checkpoint(config_data: dict, at_step: int = 4) -> None:
    """The real loop until step `at_step`'s checkpoint is registered; then rank 0 prints
    CHECKPOINTED and every rank blocks, as a driver about to be killed would see it."""
    import ray.train

    real_report = ray.train.report

    def report(metrics, checkpoint=None, **kwargs):
        real_report(metrics, checkpoint=checkpoint, **kwargs)
        if metrics["step"] == at_step:
            ray.train.get_all_reported_checkpoints(timeout_s=120)
            if ray.train.get_context().get_world_rank() == 0:
                print(f"CHECKPOINTED step {at_step}", flush=True)
            threading.Event().wait()

    ray.train.report = report
    from raymed.train import train_loop_per_worker

    train_loop_per_worker(config_data)


def kill_rank1_after_checkpoint_once(config_data: dict, at_step: int = 4) -> None:
    """The real loop, with rank 1 dying (os._exit) on the first attempt just after step
    `at_step`'s checkpoint is registered, before the next step. A marker file under
    storage_path makes the fault one-shot."""
    import ray.train

    from raymed.config import Config
    from raymed.train import WorkerLoop

    marker = Path(config_data["storage_path"]) / "killed"

    class Killed(WorkerLoop):
        def _train_step(self, stream):
            if self.step == at_step and not marker.exists() and ray.train.get_context().get_world_rank() == 1:
                ray.train.get_all_reported_checkpoints(timeout_s=120)  # step at_step's is registered
                marker.touch()
                os._exit(1)
            return super()._train_step(stream)

    Killed(Config.model_validate(config_data)).run()
