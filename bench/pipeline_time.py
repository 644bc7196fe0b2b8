"""Wall time of `make demo`'s pipeline, per stage: cold (a fresh RAYMED_CACHE and storage
directory, so the assets are built too) and warm (the same command again: finished stages
are skipped; deploy and ask always run).

    python bench/pipeline_time.py                     # the cpu-demo preset (gpu with CUDA)
    python bench/pipeline_time.py --config ci-tiny --set train.max_steps=4

Each run is `raymed pipeline --no-serve` in its own process (a local Ray started and
stopped with it), so `wall_s` includes Ray's start-up; the stages' own times come from the
run's pipeline/summary.json. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_once(args: list[str], env: dict, storage: Path) -> dict:
    """One pipeline process; its wall time and the per-stage times it recorded."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "raymed", "pipeline", "--no-serve", *args,
                           "--set", f"storage_path={storage}"], env=env, cwd=REPO, capture_output=True, text=True)
    wall = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        sys.exit(f"pipeline failed after {wall} s:\n{done.stderr[-3000:]}")
    summary = json.loads(next(storage.glob("runs/*/pipeline/summary.json")).read_text())
    answer = next(line for line in done.stdout.splitlines() if line.startswith("[pipeline] answer from"))
    return {"wall_s": wall, "stages_s": summary["seconds"], "stages": summary["stages"], "served": answer}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a preset or YAML (default: as `make demo` picks)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    options = parser.parse_args()
    args = [*(["--config", options.config] if options.config else []),
            *(f"--set={o}" for o in options.overrides), f"--set=serve.port={_free_port()}"]
    with tempfile.TemporaryDirectory(prefix="raymed-bench-") as tmp:
        env = {**os.environ, "RAYMED_CACHE": str(Path(tmp) / "cache"), "PYTHONPATH": str(REPO)}
        env.pop("RAY_ADDRESS", None)
        storage = Path(tmp) / "storage"
        cold = run_once(args, env, storage)
        warm = run_once(args, env, storage)
    return {"benchmark": "pipeline_time", "config": options.config or "make demo's", "overrides": options.overrides,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or 'unknown CPU'}",
            "load_average_after": [round(x, 1) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d"), "cold": cold, "warm": warm}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
