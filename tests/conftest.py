"""Shared fixtures. Model-sized work lives behind `default_assets` (built once into the real
cache, as `raymed assets` would; a second call is a cheap check) and is marked slow."""

from __future__ import annotations

from pathlib import Path

import pytest

from raymed.assets import build_assets, default_cache_dir


@pytest.fixture(scope="session")
def default_assets() -> Path:
    """RAYMED_CACHE with every default asset built (idempotent)."""
    build_assets()
    return default_cache_dir()
