"""End to end against a real cluster: `ray start --head` on loopback, `ray job submit
--working-dir .` of jobs/pipeline.py (the ci-tiny preset on a small corpus), the deployed
endpoint queried over HTTP; a resubmission with a changed train field skips what finished
upstream of it (the data stage) and re-runs training onward. (That an unchanged rerun skips
every stage is tests/test_pipeline.py's, on the same stage records.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import requests

from corpora import signs_corpus
from serve_support import free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
RUN = "job-e2e"


class Head:
    """A `ray start --head --block` of our own (own ports, own temp dir), torn down by
    ending that process tree only: never `ray stop`, which would end every cluster here."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="rmj", dir="/tmp")  # short: Ray's socket paths must fit
        self.dashboard = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
        self.env.pop("RAY_ADDRESS", None)
        ports = {"--port": free_port(), "--dashboard-port": self.dashboard, "--ray-client-server-port": free_port(),
                 "--node-manager-port": free_port(), "--object-manager-port": free_port(),
                 "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
                 "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
        command = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                   "--num-cpus=4", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
                   *(f"{flag}={port}" for flag, port in ports.items())]
        self.process = subprocess.Popen(command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        wait_for(lambda: self.process.poll() is None and self.ray("job", "list").returncode == 0, timeout=180,
                 interval=2)

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args, "--address", self.address], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)

    def submit(self, job_id: str, *job_args: str) -> tuple[bool, str]:
        """Submit jobs/pipeline.py and wait for it to end; (whether it succeeded, the job's logs)."""
        submitted = subprocess.run(
            [RAY, "job", "submit", "--address", self.address, "--submission-id", job_id, "--working-dir", ".",
             "--", "python", "jobs/pipeline.py", *job_args],
            env=self.env, cwd=REPO, capture_output=True, text=True, timeout=900)
        status = self.ray("job", "status", job_id).stdout.lower()
        logs = self.ray("job", "logs", job_id).stdout
        assert submitted.returncode == 0 or "failed" in status, submitted.stderr[-2000:]
        return f"job '{job_id}' succeeded" in status, logs

    def stop(self) -> None:
        try:
            tree = [self.process, *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for process in tree:
            _signal(process, "terminate")
        _, alive = psutil.wait_procs(tree, timeout=30)
        for process in alive:
            _signal(process, "kill")
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _signal(process, how: str) -> None:
    try:
        getattr(process, how)()
    except psutil.NoSuchProcess:
        pass


@pytest.fixture
def head():
    cluster = Head()
    yield cluster
    cluster.stop()


def records(storage: Path) -> dict[str, dict]:
    directory = storage / "runs" / RUN / "pipeline"
    return {p.stem: json.loads(p.read_text()) for p in directory.glob("*.json") if p.stem != "summary"}


def ask(port: int) -> dict:
    response = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
        "model": "medical-assistant", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "What is a fever?"}]})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two pipeline jobs: 292-349 s here, but a slower CI machine reached the default 900 s
def test_pipeline_job_runs_resumes_and_reruns_what_changed(head, default_assets, tmp_path):
    storage, port = tmp_path / "storage", free_port()
    args = ["--config", "ci-tiny", "--set", f"run_name={RUN}", "--set", f"storage_path={storage}",
            "--set", f"data.train_path={signs_corpus(tmp_path / 'corpus')}", "--set", "data.block_size=64",
            "--set", "train.num_workers=1", "--set", "train.max_steps=4", "--set", "train.warmup_steps=1",
            "--set", "train.eval_every=2", "--set", "eval.max_items=8", "--set", f"serve.port={port}",
            "--set", "pipeline.max_tokens=8"]
    distilling = ["--set", "pipeline.distill=true", "--set", "distill.student_layers=[0]"]

    succeeded, logs = head.submit("pipeline-1", *args, *distilling)
    assert succeeded, logs[-3000:]
    assert "[pipeline] answer from medical-assistant v1, promoted from this run's candidate" in logs
    first = records(storage)
    assert {name: r["status"] for name, r in first.items()} == dict.fromkeys(
        ["assets", "index", "data", "train", "evaluate", "promote", "distill", "deploy", "ask"], "done")
    # the promoted version, distilled into its one-layer student, gated into the student's own registry
    assert "[pipeline] student gate: " in logs and "serve the student: raymed serve" in logs
    student = first["distill"]["outputs"]
    assert student["registry"] == "medical-assistant-small"
    assert (storage / "registry" / "medical-assistant-small" / student["current"]).is_dir()
    assert (storage / "runs" / f"{RUN}-distill" / "student" / "config.json").is_file()
    answer = ask(port)  # the deployment outlives the job
    assert answer["model"] == "medical-assistant" and answer["usage"]["completion_tokens"] >= 1
    (v1_scores,) = storage.glob("registry/medical-assistant/scores/v1/*.json")  # cached at v1's promotion
    cached_at = v1_scores.stat().st_mtime_ns

    succeeded, logs = head.submit("pipeline-2", *args, "--set", "train.lr=0.002")
    assert succeeded, logs[-3000:]
    assert "[pipeline] data: skipped" in logs
    for stage in ("train", "evaluate", "promote"):
        assert f"[pipeline] {stage}: ran in " in logs
        assert records(storage)[stage]["finished"] > first[stage]["finished"]
    assert records(storage)["data"]["finished"] == first["data"]["finished"]
    # v1 was not scored again: neither the evaluate stage nor the gate, which took its cached scores
    evaluated = json.loads((storage / "runs" / RUN / "eval" / "eval.json").read_text())
    promoted = json.loads((storage / "runs" / RUN / "promote" / "eval.json").read_text())
    assert set(evaluated["models"]) == {"candidate"} and set(promoted["models"]) == {"v1", "c1"}
    assert v1_scores.stat().st_mtime_ns == cached_at
    ask(port)
