"""Where a training run lives on disk."""

from __future__ import annotations

from pathlib import Path

from raymed.config import Config


def train_dir(config: Config) -> Path:
    """Where Ray Train writes this run (checkpoints under <run_name>/, logs under logs/);
    a sweep's trial writes under the sweep's tune/ directory instead."""
    run = Path(config.storage_path).expanduser() / "runs" / config.run_name
    return run / "tune" / "trials" / config.trial_name if config.trial_name else run / "train"


def checkpoints_dir(config: Config) -> Path:
    """The directory of the run's `checkpoint_*` directories (Ray Train's run directory)."""
    return train_dir(config) / (config.trial_name or config.run_name)
