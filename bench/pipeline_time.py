"""Wall time of `make demo`'s pipeline, per stage: cold (a fresh RAYMED_CACHE and storage
directory, so the assets are built too) and warm (the same command again: finished stages
are skipped; deploy and ask always run).

    python bench/pipeline_time.py --fresh-clone       # what a new user meets: clone, install, demo
    python bench/pipeline_time.py                     # this checkout's venv, cpu-demo (gpu with CUDA)
    python bench/pipeline_time.py --config ci-tiny --set train.max_steps=4

With `--fresh-clone` the committed HEAD is cloned into a temporary directory, `make`
installs its virtual environment there (timed as `install_s`, with empty pip, Hugging Face
and raymed caches) and the cold and warm runs are `make demo ARGS=--no-serve ...` in that
clone, so `cold_total_s` is a newcomer's first `make demo`. Without it each run is
`python -m raymed pipeline --no-serve` from this checkout. Either way `wall_s` includes
Ray's start-up; the stages' own times come from the run's pipeline/summary.json. Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(command: list[str], env: dict, cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    wall = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        sys.exit(f"{shlex.join(command)} failed after {wall} s:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return wall, done


def run_once(command: list[str], env: dict, cwd: Path, storage: Path) -> dict:
    """One pipeline run; its wall time and the per-stage times it recorded."""
    wall, done = timed(command, env, cwd)
    summary = json.loads(next(storage.glob("runs/*/pipeline/summary.json")).read_text())
    answer = next(line for line in done.stdout.splitlines() if line.startswith("[pipeline] answer from"))
    return {"wall_s": wall, "stages_s": summary["seconds"], "stages": summary["stages"], "served": answer,
            "console_lines": len(done.stdout.splitlines())}


def pipeline_command(pipeline_args: list[str], fresh_clone: bool) -> list[str]:
    if fresh_clone:
        return ["make", "--no-print-directory", "demo", f"ARGS=--no-serve {shlex.join(pipeline_args)}"]
    return [sys.executable, "-m", "raymed", "pipeline", "--no-serve", *pipeline_args]


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh-clone", action="store_true", help="clone HEAD, install with make, run make demo")
    parser.add_argument("--config", help="a preset or YAML (default: as `make demo` picks)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="raymed-bench-") as tmp:
        tmp = Path(tmp)
        storage = tmp / "storage"
        args = [*(["--config", options.config] if options.config else []),
                *(f"--set={o}" for o in options.overrides),
                f"--set=serve.port={_free_port()}", f"--set=storage_path={storage}"]
        env = {**os.environ, "RAYMED_CACHE": str(tmp / "cache")}
        env.pop("RAY_ADDRESS", None)
        result = {"benchmark": "pipeline_time", "config": options.config or "make demo's",
                  "overrides": options.overrides, "fresh_clone": options.fresh_clone}
        if options.fresh_clone:
            cwd = tmp / "raymed"
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                    text=True, check=True).stdout.strip()
            subprocess.run(["git", "clone", "--quiet", str(REPO), str(cwd)], check=True)
            env.update(PIP_CACHE_DIR=str(tmp / "pip-cache"), HF_HOME=str(tmp / "hf"))
            env.pop("VIRTUAL_ENV", None)
            result["commit"] = commit
            result["install_s"], _ = timed(["make", "--no-print-directory", ".venv/.installed"], env, cwd)
        else:
            cwd = REPO
            env["PYTHONPATH"] = str(REPO)
        command = pipeline_command(args, options.fresh_clone)
        result["cold"] = run_once(command, env, cwd, storage)
        result["warm"] = run_once(command, env, cwd, storage)
        if options.fresh_clone:
            result["cold_total_s"] = round(result["install_s"] + result["cold"]["wall_s"], 1)
    return {**result,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or 'unknown CPU'}",
            "load_average_after": [round(x, 1) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
