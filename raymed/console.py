"""What a `raymed` command prints, and where everything else goes.

Quiet (the default): the terminal gets raymed's own lines (`say`), its errors (`error`) and
one progress bar at a time (`progress`, drawn only on a terminal). Once a command starts
Ray (`start_ray`), everything else the process writes goes to `<run dir>/raymed.log`:
Ray's own logs, what Ray forwards from its workers and actors (Ray Data, Ray Train, Tune,
Serve), Python warnings and tracebacks, native libraries' output. Its path is printed
when it opens and repeated in any error.

Verbose (`-v`, or RAYMED_LOG_LEVEL set to a level name such as DEBUG or INFO): nothing is
redirected, and Python's, Ray's and Serve's loggers log at that level (INFO for `-v`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

LOG_FILE = "raymed.log"
LEVEL_VARIABLE = "RAYMED_LOG_LEVEL"


@dataclass
class Session:
    """One command's console: quiet or verbose, and (quiet, once Ray starts) the log file
    that fds 1 and 2, `sys.stdout` and `sys.stderr` point at."""

    level: str | None = None
    """The log level asked for (verbose), or None (quiet)."""
    log_path: Path | None = None
    stage: str | None = None
    """The pipeline stage running now: progress bars are labelled with it."""
    bar: object = None
    """The progress bar drawn now (one at a time)."""
    _terminal: tuple[TextIO, TextIO] | None = None
    _restore: list = field(default_factory=list)

    @property
    def verbose(self) -> bool:
        return self.level is not None

    def out(self) -> TextIO:
        return self._terminal[0] if self._terminal else sys.stdout

    def err(self) -> TextIO:
        return self._terminal[1] if self._terminal else sys.stderr

    def capture(self, log_path: Path) -> None:
        """Send this process's output to `log_path` from now on (the terminal keeps raymed's lines)."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        log = open(log_path, "a", buffering=1, encoding="utf-8")
        self._terminal = (_duplicate(sys.stdout, 1), _duplicate(sys.stderr, 2))
        saved = (sys.stdout, sys.stderr, os.dup(1), os.dup(2))
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        self._restore.append(lambda: _undo_capture(log, saved, self._terminal))
        if not _ray_running():  # a Ray this command starts ends while its output still goes to the log
            self._restore.append(_shutdown_ray)
        self.log_path = log_path

    def close(self) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()
        self._terminal = None
        self.log_path = None


def _duplicate(stream: TextIO, fd: int) -> TextIO:
    """A stream to what `fd` is now (the terminal), when `stream` writes to `fd`; else `stream`
    itself (one that is not a file descriptor, such as pytest's capture, is left as it is)."""
    try:
        writes_to_fd = stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        writes_to_fd = False
    if not writes_to_fd:
        return stream
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8")


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray and ray.is_initialized())


def _shutdown_ray() -> None:
    if _ray_running():
        sys.modules["ray"].shutdown()


def _undo_capture(log: TextIO, saved: tuple, terminal: tuple[TextIO, TextIO]) -> None:
    stdout, stderr, fd1, fd2 = saved
    for stream in terminal:
        if stream not in (stdout, stderr):  # a duplicate of ours
            stream.close()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(fd1, 1)
    os.dup2(fd2, 2)
    os.close(fd1)
    os.close(fd2)
    sys.stdout, sys.stderr = stdout, stderr
    log.close()


_session = Session()


def session() -> Session:
    return _session


@contextmanager
def command_session(verbose: bool = False):
    """The console for one command: verbose with `verbose` or RAYMED_LOG_LEVEL, else quiet.
    Whatever it redirected is put back when the command ends."""
    global _session
    level = log_level(verbose)
    if level:
        logging.basicConfig(level=level)
        logging.getLogger().setLevel(level)
    _session = Session(level=level)
    try:
        yield _session
    finally:
        _session.close()


def log_level(verbose: bool) -> str | None:
    """RAYMED_LOG_LEVEL (a `logging` level name), else INFO with `verbose`, else None (quiet)."""
    from raymed.errors import RaymedError

    level = os.environ.get(LEVEL_VARIABLE, "").strip().upper()
    if level and not isinstance(logging.getLevelName(level), int):
        raise RaymedError(f"{LEVEL_VARIABLE}={level!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
    return level or ("INFO" if verbose else None)


def say(text: str = "", end: str = "\n") -> None:
    """One of raymed's own lines: to the terminal (and to the log file, for context)."""
    _write(_session.out(), text + end)


def error(message: str, exc: BaseException | None = None) -> None:
    """An error: its message to the terminal, with the log file's path when there is one;
    `exc`'s traceback to the log file."""
    if exc is not None and _session.log_path:
        traceback.print_exception(exc, file=sys.stderr)
    where = f" (Ray's output and the traceback: {_session.log_path})" if _session.log_path else ""
    _write(_session.err(), f"{message}{where}\n")


def _write(stream: TextIO, text: str) -> None:
    """`text` to `stream`, the progress bar (if one is drawn) cleared first and redrawn after."""
    bar = _session.bar
    if bar is None:
        stream.write(text)
        stream.flush()
    else:
        with bar.get_lock():
            bar.clear(nolock=True)
            stream.write(text)
            stream.flush()
            bar.refresh(nolock=True)
    if _session.log_path and stream is not sys.stdout:
        sys.stdout.write(text)


def start_ray(run_directory: Path) -> None:
    """`open_log`, then join RAY_ADDRESS's cluster or start a local one (`init_ray`)."""
    open_log(run_directory)
    init_ray()


def open_log(run_directory: Path) -> None:
    """Quiet: from now on, this process's output goes to `<run_directory>/raymed.log`; say so."""
    if not _session.verbose and _session.log_path is None:
        _session.capture(Path(run_directory) / LOG_FILE)
        say(f"raymed: Ray's output goes to {_session.log_path} (-v shows it here)")


def init_ray() -> None:
    """Join RAY_ADDRESS's cluster or start a local one (once), Ray's logging at the session's
    level; workers' output is forwarded (to the log file, when quiet)."""
    import ray

    quiet_ray_data()
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True, logging_level=_session.level or logging.INFO)


def quiet_ray_data() -> None:
    """Quiet: no Ray Data progress bars (they are redrawn lines: noise in a log file)."""
    if _session.verbose:
        return
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def serve_logging():
    """Serve's logging config: its components and replicas log at the session's level."""
    from ray.serve.schema import LoggingConfig

    return LoggingConfig(log_level=_session.level or "INFO")


@contextmanager
def running_stage(name: str):
    """While pipeline stage `name` runs: progress bars are labelled with it, and a stage that
    draws none shows its running time."""
    _session.stage = name
    try:
        with progress("running") as bar:
            ticker = _tick(bar)
            try:
                yield
            finally:
                ticker.set()
    finally:
        _session.stage = None


@contextmanager
def progress(what: str, total: int | None = None, unit: str = "it"):
    """A progress bar on the terminal (nothing elsewhere): `what` of the running stage, counted
    in `unit`s up to `total` (without a total: the time it has taken). Inside a stage, the
    stage's bar is reused, so one bar at a time is drawn; it is cleared when done."""
    from tqdm import tqdm

    label = f"[pipeline] {_session.stage}: {what}" if _session.stage else what
    current = _session.bar
    if current is not None:
        current.unit, current.bar_format = unit, None if total else "{desc} {elapsed}"
        current.set_description(label, refresh=False)
        current.reset(total=total)  # redraws it
        yield current
        return
    bar = tqdm(total=total, desc=label, unit=unit, file=_session.err(), leave=False, dynamic_ncols=True,
               disable=not _session.err().isatty(), bar_format=None if total else "{desc} {elapsed}")
    _session.bar = bar
    try:
        yield bar
    finally:
        _session.bar = None
        bar.close()


def _tick(bar, seconds: float = 1.0) -> threading.Event:
    """Refresh `bar` every `seconds` (so its elapsed time moves) until the returned event is set."""
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(seconds):
            bar.refresh()

    threading.Thread(target=refresh, name="raymed-progress", daemon=True).start()
    return stop
