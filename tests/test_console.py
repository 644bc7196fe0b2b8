"""What a user's terminal receives: the ci-tiny pipeline run on a pseudo-terminal prints
raymed's own lines only (each stage, the answer, where the log is), while Ray's output
lands in the run's raymed.log; an error names its cause and the log file."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from corpora import signs_corpus
from serve_support import free_port

from raymed.console import LOG_FILE, command_session, error, log_level, open_log, say

RAYMED = str(Path(sys.executable).with_name("raymed"))
STAGES = ("assets", "index", "data", "train", "evaluate", "promote", "deploy", "ask")
RUN = "console"


def on_a_terminal(args: list[str], timeout: float) -> tuple[int, str]:
    """Run `raymed ARGS` with stdout and stderr on one pseudo-terminal (as in a shell); its exit
    status and everything the terminal received."""
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAYMED_LOG_LEVEL")}
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
    process = subprocess.Popen([RAYMED, *args], stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
                               env=env, close_fds=True)
    os.close(terminal)
    received = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the process and its children are gone
            break
        if not chunk:
            break
        received.append(chunk)
    os.close(controller)
    return process.wait(timeout=timeout), b"".join(received).decode(errors="replace")


def shown(terminal: str) -> list[str]:
    """The lines a terminal shows at the end: what follows the last carriage return of each
    line (a progress bar is redrawn, and cleared, behind one)."""
    return [line.split("\r")[-1] for line in terminal.replace("\r\n", "\n").split("\n")]


def pipeline_args(tmp_path: Path, *extra: str) -> list[str]:
    overrides = [f"run_name={RUN}", f"storage_path={tmp_path / 'storage'}",
                 f"data.train_path={signs_corpus(tmp_path / 'corpus')}", "data.block_size=64", "train.num_workers=1",
                 "train.max_steps=4", "train.warmup_steps=1", "train.eval_every=2", "eval.max_items=8",
                 f"serve.port={free_port()}", "pipeline.max_tokens=8", *extra]
    return ["pipeline", "--config", "ci-tiny", "--no-serve", *(a for o in overrides for a in ("--set", o))]


@pytest.mark.slow
def test_the_pipeline_prints_raymeds_lines_only_and_ray_goes_to_the_log(default_assets, tmp_path):
    code, terminal = on_a_terminal(pipeline_args(tmp_path), timeout=900)
    run = tmp_path / "storage" / "runs" / RUN
    assert code == 0, terminal[:3000]
    lines = shown(terminal)
    assert len(lines) <= 40, terminal
    assert f"raymed: Ray's output goes to {run / LOG_FILE} (-v shows it here)" in lines[0]
    for stage in STAGES:
        assert sum(line.startswith(f"[pipeline] {stage}: ran in ") for line in lines) == 1, (stage, terminal)
    assert "[pipeline] gate: " in terminal
    answer = json.loads((run / "pipeline" / "ask.json").read_text())["outputs"]["answer"]
    assert answer in "\n".join(lines)
    assert "pipeline.max_tokens=8" in answer  # 8 tokens of a random tiny model: cut, and said so
    for noise in ("PlacementGroupCleaner", "Execution plan", "INFO", "Warning", "(pid="):
        assert noise not in terminal, noise
    log = (run / LOG_FILE).read_text()
    for ray_output in ("Started a local Ray instance", "Execution plan of Dataset", "[pipeline] answer from"):
        assert ray_output in log, ray_output


def test_an_error_after_the_log_opened_names_its_cause_and_the_log(tmp_path, capsys):
    with command_session():
        open_log(tmp_path)
        print("what Ray would print")
        try:
            raise ValueError("no such corpus: /nowhere.jsonl")
        except ValueError as err:
            error("raymed: error: data failed", exc=err)
    terminal = capsys.readouterr()
    assert terminal.out == f"raymed: Ray's output goes to {tmp_path / LOG_FILE} (-v shows it here)\n"
    assert terminal.err == f"raymed: error: data failed (Ray's output and the traceback: {tmp_path / LOG_FILE})\n"
    log = (tmp_path / LOG_FILE).read_text()
    assert "what Ray would print" in log and "ValueError: no such corpus" in log and "data failed" in log


@pytest.mark.slow
def test_a_failing_pipeline_stage_reaches_the_terminal_with_the_log_path(default_assets, tmp_path):
    missing = tmp_path / "missing.jsonl"
    args = pipeline_args(tmp_path, f"data.train_path={missing}")
    code, terminal = on_a_terminal(args, timeout=600)
    assert code == 1
    log = tmp_path / "storage" / "runs" / RUN / LOG_FILE
    (error_line,) = [line for line in shown(terminal) if line.startswith("raymed: error:")]
    assert "pipeline stage 'data' failed" in error_line and str(missing) in error_line, terminal
    assert error_line.endswith(f"(Ray's output and the traceback: {log})"), terminal
    assert "Traceback" not in terminal and "Traceback" in log.read_text()


def test_verbose_redirects_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAYMED_LOG_LEVEL", raising=False)
    with command_session(verbose=True) as console:
        open_log(tmp_path)
        say("a line")
    assert console.level == "INFO" and not (tmp_path / LOG_FILE).exists()
    assert capsys.readouterr().out == "a line\n"


def test_raymed_log_level_turns_verbose_on_and_a_bad_one_is_refused(monkeypatch):
    from raymed.errors import RaymedError

    monkeypatch.setenv("RAYMED_LOG_LEVEL", "debug")
    assert log_level(verbose=False) == "DEBUG"
    monkeypatch.setenv("RAYMED_LOG_LEVEL", "loud")
    with pytest.raises(RaymedError, match="RAYMED_LOG_LEVEL='LOUD' is not a logging level"):
        log_level(verbose=False)
    monkeypatch.delenv("RAYMED_LOG_LEVEL")
    assert log_level(verbose=False) is None and log_level(verbose=True) == "INFO"


def test_training_progress_reads_the_last_complete_logged_step(tmp_path):
    from raymed.train.progress import last_step

    metrics = tmp_path / "metrics.jsonl"
    assert last_step(metrics) == 0  # not written yet
    metrics.write_text("".join(json.dumps({"step": step, "train_loss": 1.0}) + "\n" for step in range(1, 400))
                       + '{"step": 400, "train_lo')  # a line being written
    assert last_step(metrics) == 399
