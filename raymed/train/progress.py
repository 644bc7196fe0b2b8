"""Training progress on the driver's console: the steps rank 0 has logged so far, read from
the runs' metrics.jsonl (flushed every logged step) while the driver waits on Ray Train."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from raymed.config import Config
from raymed.console import progress
from raymed.train.paths import train_dir
from raymed.train.runlog import METRICS_FILE


@contextmanager
def training_progress(config: Config, sweep: bool = False):
    """A progress bar over the training steps of `config`'s run (or, `sweep`, of every trial
    together: a trial ASHA stops early leaves the bar short of its total)."""
    if sweep:
        from raymed.sweep import sweep_dir

        trials = sweep_dir(config) / "trials"
        files, total = (lambda: trials.glob(f"*/logs/{METRICS_FILE}")), config.tune.num_samples * config.train.max_steps
    else:
        path = train_dir(config) / "logs" / METRICS_FILE
        files, total = (lambda: [path]), config.train.max_steps
    with progress("training", total=total, unit="step") as bar:
        stop = _follow(files, lambda steps: bar.update(steps - bar.n))
        try:
            yield
        finally:
            stop.set()


def _follow(files: Callable[[], Iterable[Path]], report: Callable[[int], None], seconds: float = 1.0) -> threading.Event:
    """Every `seconds`, `report` the sum of the last logged step of each file, until the event is set."""
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(seconds):
            report(sum(last_step(path) for path in files()))

    threading.Thread(target=follow, name="raymed-train-progress", daemon=True).start()
    return stop


def last_step(path: Path) -> int:
    """The `step` of the last complete line of a metrics.jsonl (0 when there is none yet)."""
    try:
        with path.open("rb") as lines:
            lines.seek(0, 2)
            lines.seek(max(0, lines.tell() - 4096))
            tail = lines.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(tail):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0
