"""Rank 0's record of a training run: TensorBoard event files, one metrics.jsonl line per
step, and train.log for events such as a resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "train.log"


class RunLog:
    """Every step's metrics (TensorBoard and metrics.jsonl) and the run's events (printed
    and appended to train.log)."""

    def __init__(self, directory: Path):
        from tensorboardX import SummaryWriter

        directory.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(directory))
        self.lines = (directory / METRICS_FILE).open("a")
        self.events = directory / EVENTS_FILE

    def note(self, message: str) -> None:
        print(message, flush=True)
        with self.events.open("a") as events:
            events.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")

    def log(self, metrics: dict) -> None:
        for name, value in metrics.items():
            if name != "step":
                self.writer.add_scalar(name, value, metrics["step"])
        self.lines.write(json.dumps(metrics) + "\n")
        self.lines.flush()

    def close(self) -> None:
        self.writer.close()
        self.lines.close()
