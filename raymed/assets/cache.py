"""The asset cache: build into a staging directory, rename into place, then write a manifest.

An asset counts as present only when its manifest exists and every file it lists has
the recorded size (and, on a full check, the recorded SHA-256). The manifest is written
last, so an interrupted build is never mistaken for a complete one, and a truncated or
edited file is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raymed.console import progress

from raymed.errors import RaymedError

MANIFESTS = ".manifests"
STAGING = ".staging"

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Asset:
    """One buildable cache entry."""

    name: str
    outputs: tuple[str, ...]
    """Paths relative to the cache root that the builder writes (files or directories)."""
    build: Callable[[Path, int, Progress], dict]
    """(staging_root, seed, progress) -> a JSON-able summary kept in the manifest."""
    recipe: str
    """Changes whenever the builder's output would change; a mismatch means rebuild."""
    progress_total: int | None = None
    progress_unit: str = "step"


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAYMED_CACHE", "~/.cache/raymed")).expanduser()


def source_digest(module) -> str:
    """A short digest of a module's source, for recipes that follow the code."""
    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:12]


def check(asset: Asset, cache: Path, seed: int, *, full: bool) -> str | None:
    """None when the asset is complete and current, else why it is not."""
    manifest = read_manifest(asset, cache)
    if manifest is None:
        return "missing"
    if (manifest.get("recipe"), manifest.get("seed")) != (asset.recipe, seed):
        return "built by another recipe or seed"
    for rel, expected in manifest["files"].items():
        path = cache / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{rel} is truncated or changed ({path.stat().st_size} bytes, expected {expected['size']})"
        if full and _sha256(path) != expected["sha256"]:
            return f"{rel} is corrupt (checksum mismatch)"
    return None


def read_manifest(asset: Asset, cache: Path) -> dict | None:
    """The asset's manifest, or None when it is absent or unreadable."""
    try:
        manifest = json.loads(_manifest_path(asset, cache).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def build(asset: Asset, cache: Path, seed: int) -> dict:
    """Build `asset` into staging, swap it into the cache, and record its manifest."""
    ensure_writable(cache)
    staging = Path(tempfile.mkdtemp(prefix=f"{asset.name}-", dir=_mkdir(cache / STAGING)))
    try:
        with progress(asset.name, total=asset.progress_total, unit=asset.progress_unit) as bar:
            summary = asset.build(staging, seed, bar.update)
        _check_outputs(asset, staging)
        files = {rel: _describe_file(staging / rel) for rel in _files_under(asset, staging)}
        _manifest_path(asset, cache).unlink(missing_ok=True)
        for rel in asset.outputs:
            _replace(staging / rel, cache / rel)
        manifest = {
            "asset": asset.name,
            "recipe": asset.recipe,
            "seed": seed,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
            "summary": summary,
        }
        _write_atomic(_manifest_path(asset, cache), json.dumps(manifest, indent=1))
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_writable(cache: Path) -> None:
    try:
        _mkdir(cache)
        with tempfile.TemporaryFile(dir=cache):
            pass
    except OSError as err:
        raise RaymedError(
            f"cache directory {cache} is not writable ({err.strerror}): "
            "set RAYMED_CACHE to a writable directory"
        ) from None


def _check_outputs(asset: Asset, staging: Path) -> None:
    missing = [rel for rel in asset.outputs if not (staging / rel).exists()]
    if missing:
        raise RaymedError(f"building {asset.name} did not produce {', '.join(missing)}")


def _files_under(asset: Asset, root: Path) -> list[str]:
    files = []
    for rel in asset.outputs:
        path = root / rel
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        files += [p.relative_to(root).as_posix() for p in found]
    return files


def _replace(src: Path, dst: Path) -> None:
    """Move src to dst, replacing what was there (old content removed after the move)."""
    _mkdir(dst.parent)
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.rename(dst, old)
    os.rename(src, dst)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def _describe_file(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    _mkdir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _manifest_path(asset: Asset, cache: Path) -> Path:
    return cache / MANIFESTS / f"{asset.name}.json"


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
