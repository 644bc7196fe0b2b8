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


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (4 logical CPUs on 2 cores, so
    two Train workers plus Ray Data actors fit)."""
    import ray

    # Workers import this checkout's raymed (not whichever one is installed) and test
    # modules (Train loops defined in tests) from tests/.
    tests_dir = Path(__file__).resolve().parent
    python_path = f"{tests_dir.parent}:{tests_dir}"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": python_path}})
    yield
    ray.shutdown()
