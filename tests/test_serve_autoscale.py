"""Autoscaling and rolling updates on real Ray Serve.

- min 1 / max 2 model replicas: requests held in flight (at the engine's admission gate, a
  signal actor: no sleeps) bring up the second replica, seen in `serve.status()`; it goes
  away once they finish.
- A rolling update under load: v1 from the registry is deployed with `deploy()` (what
  `raymed serve --deploy` runs), clients keep asking, v2 is promoted and deployed: no
  request fails, and requests made after the deploy report v2."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import ray
import requests
from serve_support import Gate, free_port, save_tiny_model, sse_events, start_app, wait_for

from raymed.config import load_config
from raymed.registry import Registry

MODEL = "tiny"


def model_replicas() -> dict[str, int]:
    """ModelServer's replicas by state, as `serve.status()` reports them."""
    from ray import serve

    app = serve.status().applications["raymed"]
    return {str(state): n for state, n in app.deployments["ModelServer"].replica_states.items() if n}


def running() -> int:
    return model_replicas().get("RUNNING", 0)


@pytest.fixture(scope="module")
def tokenizer_dir(default_assets):
    return default_assets / "models" / "smollm2-135m-instruct"


@pytest.mark.slow
def test_load_brings_up_a_second_replica_and_it_goes_away_after(ray_cluster, tmp_path, tokenizer_dir):
    from ray import serve

    from raymed.serve.app import build_application

    gate = Gate.remote()
    config = load_config(None, [
        f"serve.model={save_tiny_model(tmp_path / MODEL, tokenizer_dir)}", "serve.num_cpus=0.5",
        "serve.min_replicas=1", "serve.max_replicas=2", "serve.target_ongoing_requests=1",
        "serve.max_ongoing_requests=4", "serve.upscale_delay_s=0", "serve.downscale_delay_s=2",
        "serve.autoscale_look_back_s=11"])
    url = start_app(build_application(config, admission_gate=gate), free_port())
    try:
        assert model_replicas() == {"RUNNING": 1}
        answers = []
        load = [threading.Thread(target=lambda: answers.append(requests.post(
            f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=300)))
            for _ in range(4)]
        for client in load:
            client.start()
        wait_for(lambda: ray.get(gate.waiting.remote()) == 4, timeout=60)  # 4 in flight against a target of 1
        wait_for(lambda: running() == 2, timeout=120, interval=0.5)

        ray.get(gate.release.remote())
        for client in load:
            client.join(timeout=120)
        assert [a.status_code for a in answers] == [200] * 4
        wait_for(lambda: model_replicas() == {"RUNNING": 1}, timeout=120, interval=0.5)
    finally:
        ray.get(gate.release.remote())
        serve.shutdown()


@dataclass
class Call:
    started: float
    finished: float
    ok: bool
    fingerprint: str | None
    detail: str


class Client(threading.Thread):
    """Asks again and again (plain and streamed, in turn) until `stop` is set; records each call."""

    def __init__(self, url: str, model: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.model, self.stop = url, model, stop
        self.calls: list[Call] = []

    def run(self):
        stream = False
        while not self.stop.is_set():
            self.calls.append(self._call(stream))
            stream = not stream

    def _call(self, stream: bool) -> Call:
        body = {"model": self.model, "messages": [{"role": "user", "content": "What is a fever?"}],
                "max_tokens": 8, "stream": stream}
        started = time.monotonic()
        try:
            response = requests.post(f"{self.url}/chat/completions", json=body, stream=stream, timeout=120)
            if response.status_code != 200:
                return Call(started, time.monotonic(), False, None, f"{response.status_code} {response.text}")
            chunks = sse_events(response) if stream else [response.json()]
            errors = [c for c in chunks if "error" in c]
            return Call(started, time.monotonic(), not errors, chunks[0].get("system_fingerprint"), str(errors))
        except Exception as err:  # a dropped connection is a failed request too
            return Call(started, time.monotonic(), False, None, repr(err))


@pytest.mark.slow
def test_a_rolling_update_under_load_fails_no_request(ray_cluster, tmp_path, tokenizer_dir):
    from ray import serve

    from raymed.serve.deploy import deploy

    config = load_config(None, [
        f"storage_path={tmp_path / 'storage'}", "serve.model=current", "serve.num_cpus=0.5",
        f"serve.port={free_port()}", "serve.min_replicas=1", "serve.max_replicas=1"])
    registry = Registry.for_config(config)
    registry.add(save_tiny_model(tmp_path / "v1", tokenizer_dir, seed=1), {"metrics": {}}, expect_current=None)
    first = deploy(config)
    assert first.version == "v1"
    stop = threading.Event()
    clients = [Client(first.url, first.model, stop) for _ in range(3)]
    try:
        for client in clients:
            client.start()
        wait_for(lambda: all(c.calls for c in clients), timeout=120)

        registry.add(save_tiny_model(tmp_path / "v2", tokenizer_dir, seed=2), {"metrics": {}}, expect_current="v1")
        deploy_started = time.monotonic()
        second = deploy(config)
        deployed = time.monotonic()
        assert second.version == "v2"
        wait_for(lambda: all(any(call.started > deployed for call in c.calls) for c in clients), timeout=120)
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=120)
        serve.shutdown()

    calls = [call for c in clients for call in c.calls]
    assert [call.detail for call in calls if not call.ok] == []
    assert any(call.started < deploy_started < call.finished for call in calls)  # in flight as the deploy began
    assert {call.fingerprint for call in calls if call.finished < deploy_started} == {f"{first.model}:v1"}
    assert {call.fingerprint for call in calls if call.started > deployed} == {f"{first.model}:v2"}
