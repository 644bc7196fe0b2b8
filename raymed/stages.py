"""The pipeline's stage runner: stages run in order, each skipped when its record says it
finished with the same fingerprint (its inputs and its upstream stages' fingerprints) and
its outputs still exist (raymed.pipeline describes the stages themselves)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from raymed.console import running_stage, say
from raymed.errors import RaymedError, last_line


class StageFailed(RaymedError):
    """A stage raised: the message names the stage and the cause."""

    def __init__(self, stage: str, cause: BaseException, completed: list[str]):
        self.stage = stage
        done = f"completed stages ({', '.join(completed)}) are skipped" if completed else "nothing completed yet"
        super().__init__(f"pipeline stage {stage!r} failed: {last_line(cause)} "
                         f"(rerun with the same run_name to continue from {stage}: {done})")


@dataclass
class Stage:
    """One step of the pipeline. `run` takes the upstream stages' outputs (by name) and
    returns this stage's outputs as JSON-able data; paths listed under `outputs["paths"]`
    must still exist for the stage to count as complete."""

    name: str
    run: Callable[[dict[str, dict]], dict]
    inputs: Callable[[], dict] | None
    """What the stage depends on besides its upstream stages (config fields, data digests);
    None for a stage that runs every time and is fingerprinted by its outputs."""
    upstream: tuple[str, ...] = ()
    clear: Callable[[], None] | None = None
    """Removes the stage's outputs before it re-runs on changed inputs."""
    still_true: Callable[[dict], bool] | None = None
    """Whether a finished run's outputs still describe the world outside the run directory
    (the registry's current version may have moved since the gate ran); when not, it runs again."""


@dataclass
class StageRun:
    name: str
    status: str  # "ran" or "skipped"
    seconds: float
    fingerprint: str
    outputs: dict = field(repr=False)


def fingerprint(value) -> str:
    """SHA-256 of a JSON-able value (keys sorted, so dict order does not matter)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def run_stages(stages: list[Stage], records: Path, log: Callable[[str], None] = say) -> dict[str, StageRun]:
    """Run `stages` in order, skipping the complete ones whose fingerprint matches their
    record; each stage's record is written to `records/<name>.json`. One line is logged
    per stage, once it has run or been skipped."""
    records.mkdir(parents=True, exist_ok=True)
    done: dict[str, StageRun] = {}
    for stage in stages:
        upstream = {name: done[name].fingerprint for name in stage.upstream}
        expected = fingerprint({"inputs": stage.inputs(), "upstream": upstream}) if stage.inputs else None
        record = read_record(records, stage.name)
        if expected and is_complete(record, expected) and (stage.still_true is None
                                                            or stage.still_true(record["outputs"])):
            log(f"[pipeline] {stage.name}: skipped (up to date, fingerprint {expected[:12]})")
            done[stage.name] = StageRun(stage.name, "skipped", 0.0, expected, record["outputs"])
            continue
        changed = bool(expected and record and record["fingerprint"] != expected and stage.clear)
        if changed:
            stage.clear()
        done[stage.name] = _run_one(stage, expected, done, records, log,
                                    note=" (inputs changed: its earlier outputs were removed)" if changed else "")
    return done


def _run_one(stage: Stage, expected: str | None, done: dict[str, StageRun], records: Path,
             log: Callable[[str], None], note: str = "") -> StageRun:
    write_record(records, stage.name, {"status": "running", "fingerprint": expected})
    started = time.monotonic()
    try:
        with running_stage(stage.name):
            outputs = stage.run({name: done[name].outputs for name in stage.upstream})
    except Exception as err:
        write_record(records, stage.name, {"status": "failed", "fingerprint": expected, "error": last_line(err)})
        raise StageFailed(stage.name, err, [name for name in done]) from err
    seconds = time.monotonic() - started
    final = expected or fingerprint({"outputs": outputs})
    write_record(records, stage.name, {"status": "done", "fingerprint": final, "outputs": outputs,
                                       "seconds": round(seconds, 2), "finished": time.time()})
    log(f"[pipeline] {stage.name}: ran in {seconds:.1f} s{note}")
    return StageRun(stage.name, "ran", seconds, final, outputs)


def is_complete(record: dict | None, expected: str) -> bool:
    """A finished record with this fingerprint whose output paths all still exist."""
    return (record is not None and record.get("status") == "done" and record.get("fingerprint") == expected
            and all(Path(p).exists() for p in record["outputs"].get("paths", [])))


def read_record(records: Path, name: str) -> dict | None:
    path = records / f"{name}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn write: the stage runs again


def write_record(records: Path, name: str, record: dict) -> None:
    """Written to a temporary file and renamed, so a crash never leaves half a record."""
    path = records / f"{name}.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({"stage": name, **record}, indent=1) + "\n")
    temporary.replace(path)
