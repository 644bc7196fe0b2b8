"""The Ray Train job: a TorchTrainer whose workers run raymed's training loop."""

from __future__ import annotations

from raymed.config import Config, TrainConfig
from raymed.errors import RaymedError, last_line
from raymed.train.loop import train_loop_per_worker
from raymed.train.model import check_model_fits
from raymed.train.paths import train_dir


def fit(config: Config, datasets: dict, loop=train_loop_per_worker, callbacks=()):
    """Run the TorchTrainer for `config` on the data stage's `datasets`; the Ray Result.
    `loop` is the per-worker function (tests wrap it to inject faults); `callbacks` are
    Ray Train callbacks (a sweep passes Tune's report callback). Worker failures
    beyond `train.max_failures` raise RaymedError naming the cause."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer

    from raymed.data.handoff import train_data_config

    train = config.train
    check_model_fits(config)
    trainer = TorchTrainer(
        loop,
        train_loop_config=config.model_dump(),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=_worker_resources(train)),
        datasets=datasets,
        dataset_config=train_data_config(config.data.deterministic),
        run_config=RunConfig(
            name=config.trial_name or config.run_name,
            storage_path=str(train_dir(config)),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints,
                                               checkpoint_score_attribute=config.tune.metric,
                                               checkpoint_score_order=config.tune.mode),
            failure_config=FailureConfig(max_failures=train.max_failures),
            callbacks=list(callbacks),
        ),
    )
    try:
        return trainer.fit()
    except WorkerGroupError as err:
        causes = "; ".join(f"rank {rank}: {last_line(error)}" for rank, error in sorted(err.worker_failures.items()))
        raise RaymedError(f"training failed after {train.max_failures} retries ({causes}); "
                          f"checkpoints and logs: {train_dir(config)}") from err


def _worker_resources(train: TrainConfig) -> dict[str, float]:
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = train.gpus_per_worker
    return resources
