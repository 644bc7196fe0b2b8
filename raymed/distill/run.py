"""A whole distillation: the teacher pinned and the student prepared, the data stage, the
Ray Train job (raymed.distill.loop on every worker), then the promotion gate into the
student's own registry model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from raymed.config import Config
from raymed.distill.loop import distill_loop_per_worker
from raymed.distill.student import prepare_run

if TYPE_CHECKING:
    from ray.train import Result

    from raymed.promote import PromotionResult


@dataclass
class DistillResult:
    config: Config
    """The config the run trained with (teacher pinned, the student in `model`, the student's registry)."""
    result: Result
    """Ray Train's."""
    promotion: PromotionResult | None
    """The gate's decision (None with `promote=False`)."""


def distill(config: Config, promote: bool = True, progress=None, datasets: dict | None = None) -> DistillResult:
    """Distill `config.distill.teacher` into the student on the data stage's blocks; with
    `promote`, gate the run's checkpoints against the student registry's current version
    (its v1: the student as it started, registered on first use) and promote the best.
    `progress(config)` wraps the training (a context manager: the CLI's progress bar);
    `datasets`: the data stage's blocks when they are built already (the pipeline's)."""
    from contextlib import nullcontext

    from raymed.data.pipeline import build_datasets
    from raymed.pipeline import run_dir
    from raymed.train import checkpoints_dir, fit

    run_config = prepare_run(config)
    if datasets is None:
        datasets, _ = build_datasets(run_config)
    with progress(run_config) if progress else nullcontext():
        result = fit(run_config, datasets, loop=distill_loop_per_worker)
    promotion = None
    if promote:
        from raymed.promote import promote_best

        promotion = promote_best([checkpoints_dir(run_config)], run_config, source=f"{run_config.run_name}/train",
                                 out_dir=run_dir(run_config) / "promote")
    return DistillResult(run_config, result, promotion)


def serve_hint(run_config: Config, version: str) -> str:
    """How to serve the student's registry `version`."""
    directory = Path(run_config.storage_path).expanduser() / "registry" / run_config.registry.name / version
    return (f"serve the student: raymed serve --set serve.model={directory} --set serve.model_name="
            f"{run_config.registry.name} (or, with this storage_path, --set registry.name={run_config.registry.name})")
