"""Personal identifiers sent to the API never reach a log, a metric label or an error message.

Identifiers are planted everywhere a client can put them (chat and completion text, a
system message, the query string, fields that fail validation and would be echoed), through
every path (JSON, SSE, 4xx errors). Then every file in this Ray session's log directory
(Serve's replica, proxy and controller logs, worker stdout/stderr, raylet, GCS) is read:
none holds an identifier, while the requests' ids are found in those same files."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from serve_support import free_port, save_tiny_model, sse_events, start_app, wait_for

from raymed.config import load_config

MODEL = "tiny"
IDENTIFIERS = {
    "name": "Johanna Xylocarpa",
    "mrn": "5829174630",
    "phone": "555-0187",
    "dob": "03/14/1979",
    "email": "jxylocarpa@example.org",
}
PATIENT = (f"Hi, my name is {IDENTIFIERS['name']}, MRN {IDENTIFIERS['mrn']}, phone +1 (415) {IDENTIFIERS['phone']}, "
           f"born {IDENTIFIERS['dob']}, email {IDENTIFIERS['email']}.")


@pytest.fixture(scope="module")
def url(ray_cluster, tmp_path_factory, default_assets):
    from ray import serve

    from raymed.serve.app import build_application

    model_dir = save_tiny_model(tmp_path_factory.mktemp("served") / MODEL,
                                default_assets / "models" / "smollm2-135m-instruct")
    config = load_config(None, [f"serve.model={model_dir}", "serve.num_cpus=1", "serve.default_max_tokens=4"])
    yield start_app(build_application(config), free_port())
    serve.shutdown()


def session_logs_dir() -> Path:
    """This Ray session's log directory (not `session_latest`: other clusters may share /tmp/ray)."""
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path())


def read_logs(directory: Path) -> dict[Path, str]:
    return {path: path.read_bytes().decode("utf-8", "replace") for path in directory.rglob("*") if path.is_file()}


def requests_with_identifiers(url: str) -> tuple[list[str], list[str]]:
    """Send identifiers through every path; returns (completion ids, Serve request ids)."""
    chat = {"model": MODEL, "max_tokens": 4,
            "messages": [{"role": "system", "content": f"The patient is {IDENTIFIERS['name']}."},
                         {"role": "user", "content": PATIENT + " I have a headache."}]}
    answers = [requests.post(f"{url}/v1/chat/completions?patient={IDENTIFIERS['email']}", json=chat, timeout=60),
               requests.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": PATIENT, "max_tokens": 4},
                             timeout=60)]
    for answer in answers:
        assert answer.status_code == 200, answer.text
    stream = requests.post(f"{url}/v1/chat/completions", json={**chat, "stream": True}, stream=True, timeout=60)
    completion_ids = [a.json()["id"] for a in answers] + [sse_events(stream)[0]["id"]]
    refused = [requests.post(f"{url}/v1/chat/completions", json={**chat, "model": IDENTIFIERS["email"]}, timeout=60),
               requests.post(f"{url}/v1/chat/completions", json={**chat, "temperature": IDENTIFIERS["dob"]}, timeout=60),
               requests.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": PATIENT, "stop": PATIENT[:38]},
                             timeout=60)]
    assert [r.status_code for r in refused] == [404, 400, 200]
    for response in [*answers, *refused]:
        for secret in IDENTIFIERS.values():
            assert secret not in response.json().get("error", {}).get("message", ""), response.text
    return completion_ids, [r.headers["x-request-id"] for r in [*answers, stream, *refused]]


@pytest.mark.slow
def test_identifiers_in_requests_never_reach_logs_metrics_or_errors(url):
    completion_ids, serve_request_ids = requests_with_identifiers(url)
    logs_dir = session_logs_dir()

    def every_id_logged():
        text = "\n".join(read_logs(logs_dir / "serve").values())
        return all(i in text for i in [*completion_ids, *serve_request_ids])

    wait_for(every_id_logged, timeout=60, interval=0.5)  # the logs we search are the ones these requests wrote
    logs = read_logs(logs_dir)
    gateway_logs = "\n".join(text for path, text in logs.items() if "Gateway" in path.name)
    assert all(i in gateway_logs for i in completion_ids)  # the app's own log lines
    leaks = {(path.name, kind) for path, text in logs.items() for kind, secret in IDENTIFIERS.items() if secret in text}
    assert not leaks
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    assert not [kind for kind, secret in IDENTIFIERS.items() if secret in metrics]
