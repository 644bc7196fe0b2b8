"""The model registry: promoted models under <storage_path>/registry/<name>/.

    registry/<name>/
      v1/            the base model, registered on first use (so there is always one to serve)
      v2/ ...        promoted models: a Hugging Face directory + manifest.json
      current        a small text file naming the version to serve ("v2")
      scores/vN/     the gate's cached scores of each version (raymed.eval.score_cache)
      .lock          held (fcntl.flock) by whoever changes the registry

Changes are atomic: a version is built in a `.staging-*` directory inside the registry,
every file fsynced, then renamed to `vN`; `current` is replaced with os.replace. A crash at
any point leaves `current` naming a complete version (a leftover staging directory is
ignored and removed by the next change). Two changes never interleave: the second waits
for the lock up to `registry.lock_timeout_s`, then fails with a clear error.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import EllipsisType

from raymed.config import Config
from raymed.errors import RaymedError

CURRENT = "current"
LOCK = ".lock"
MANIFEST = "manifest.json"
SCORES = "scores"
STAGING_PREFIX = ".staging-"
VERSION = re.compile(r"^v([1-9][0-9]*)$")
MODEL_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model")
"""Files a version keeps from a model directory (weights as safetensors only)."""
SKIPPED = {"trainer_state.json", "raymed_complete.json", MANIFEST}
"""Training state that is not part of the model."""


class StaleCurrent(RaymedError):
    """`current` changed between the evaluation and the promotion that relied on it."""


class Registry:
    """One registry entry (`registry/<name>/`) on a local or NFS path."""

    def __init__(self, root: str | Path, lock_timeout_s: float = 600):
        self.root = Path(root).expanduser()
        self.lock_timeout_s = lock_timeout_s

    @classmethod
    def for_config(cls, config: Config) -> Registry:
        storage = config.storage_path
        if "://" in storage:
            raise RaymedError(f"the registry needs a local or NFS storage_path (file locks and renames), "
                              f"not a URI: {storage}")
        return cls(Path(storage).expanduser() / "registry" / config.registry.name, config.registry.lock_timeout_s)

    @property
    def name(self) -> str:
        return self.root.name

    # ------------------------------------------------------------ reading

    def versions(self) -> list[str]:
        """Complete versions, oldest first (a version directory only exists complete)."""
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir()
                 if p.is_dir() and VERSION.match(p.name) and (p / MANIFEST).is_file()]
        return sorted(found, key=_number)

    def current(self) -> str | None:
        """The version `current` names (None in an empty registry)."""
        try:
            version = (self.root / CURRENT).read_text().strip()
        except FileNotFoundError:
            return None
        if not VERSION.match(version) or not (self.root / version / MANIFEST).is_file():
            raise RaymedError(f"registry {self.root}: current names {version!r}, which is not a complete version "
                              f"({', '.join(self.versions()) or 'none'}): fix it with `raymed registry rollback VERSION`")
        return version

    def path(self, version: str) -> Path:
        if version not in self.versions():
            raise RaymedError(f"registry {self.root} has no version {version!r} "
                              f"(it has {', '.join(self.versions()) or 'none'})")
        return self.root / version

    def scores_dir(self, version: str) -> Path:
        """Where the gate caches `version`'s scores (raymed.eval.score_cache), beside the versions."""
        return self.root / SCORES / self.path(version).name

    def manifest(self, version: str) -> dict:
        return json.loads((self.path(version) / MANIFEST).read_text())

    def verify(self, version: str) -> list[str]:
        """Problems with a version's files against its manifest (sizes and SHA-256); [] when intact."""
        directory, problems = self.path(version), []
        for name, expected in self.manifest(version)["files"].items():
            path = directory / name
            if not path.is_file():
                problems.append(f"{name} is missing")
            elif path.stat().st_size != expected["size"] or file_sha256(path) != expected["sha256"]:
                problems.append(f"{name} differs from its manifest")
        return problems

    # ------------------------------------------------------------ changing

    @contextmanager
    def lock(self):
        """Exclusive use of the registry (across processes and hosts sharing the path)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.lock_timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = (self.root / LOCK).read_text().strip() or "another process"
                        raise RaymedError(
                            f"registry {self.root} is busy: {holder} still holds its lock after "
                            f"{self.lock_timeout_s:g}s (registry.lock_timeout_s); try again when it finishes"
                        ) from None
                    time.sleep(0.05)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def add(self, model_dir: str | Path, manifest: dict, *, expect_current: str | None | EllipsisType = ...) -> str:
        """Copy `model_dir` in as the next version and make it current, atomically.
        With `expect_current`, fail (StaleCurrent, nothing changed) unless `current` still
        names that version (None: the registry must be empty)."""
        model_dir = Path(model_dir)
        with self.lock():
            current = self.current()
            if expect_current is not ... and current != expect_current:
                raise StaleCurrent(f"registry {self.root}: current moved from {expect_current} to {current} "
                                   "while this promotion was evaluating: rerun it to compare against the new version")
            self._remove_staging()
            versions = self.versions()
            version = f"v{_number(versions[-1]) + 1 if versions else 1}"
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
            files = {}
            for source in model_files(model_dir):
                _copy_file(source, staging / source.name)
                files[source.name] = {"size": source.stat().st_size, "sha256": file_sha256(staging / source.name)}
            full = {"name": self.name, "version": version, "created": _now(), **manifest, "files": files}
            _write_synced(staging / MANIFEST, json.dumps(full, indent=1) + "\n")
            _fsync_dir(staging)
            os.rename(staging, self.root / version)
            _fsync_dir(self.root)
            self._set_current(version)
        return version

    def rollback(self, version: str | None = None) -> tuple[str, str]:
        """Point `current` at `version` (default: the one before current); (old, new).
        Models are never deleted, so a rollback can itself be undone."""
        with self.lock():
            old = self.current()
            if version is None:
                older = [v for v in self.versions() if old is None or _number(v) < _number(old)]
                if not older:
                    raise RaymedError(f"registry {self.root}: nothing before {old} to roll back to")
                version = older[-1]
            self.path(version)  # exists and is complete
            self._set_current(version)
        return old, version

    def _set_current(self, version: str) -> None:
        staged = self.root / f".{CURRENT}.tmp"
        _write_synced(staged, version + "\n")
        os.replace(staged, self.root / CURRENT)
        _fsync_dir(self.root)

    def _remove_staging(self) -> None:
        """Leftovers of interrupted changes (only ever removed under the lock)."""
        for path in self.root.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def model_files(model_dir: Path) -> list[Path]:
    """The files of a model directory a registry version keeps: config, safetensors
    weights, tokenizer and chat template (not optimizer or trainer state)."""
    files = sorted(p for p in Path(model_dir).iterdir()
                   if p.is_file() and p.name.endswith(MODEL_SUFFIXES) and p.name not in SKIPPED)
    if not any(p.name.endswith(".safetensors") for p in files):
        raise RaymedError(f"{model_dir} has no safetensors weights to register")
    return files


def _copy_file(source: Path, target: Path) -> None:
    """Copy and fsync one file (the step a crash test interrupts)."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _number(version: str) -> int:
    return int(version[1:])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
