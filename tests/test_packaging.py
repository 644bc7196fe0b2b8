"""raymed as users install it: a wheel, into a fresh virtual environment outside the
repository, still has its presets (package data, not files beside the package)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_wheel_installed_outside_the_repository_loads_a_preset_by_name(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path / "dist"),
                    str(REPO)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("raymed-*.whl")
    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=True)
    subprocess.run([fresh / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300)
    # raymed comes from the wheel; its dependencies from this test run's environment (not
    # reinstalled: they are large), whose site-packages holds no raymed of its own.
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    where = subprocess.run([fresh / "bin" / "python", "-c", "import raymed; print(raymed.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(fresh)
    shown = subprocess.run([fresh / "bin" / "raymed", "config", "--config", "cpu-demo"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "run_name: cpu-demo" in shown.stdout
