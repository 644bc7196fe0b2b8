"""Auth, back-pressure and several replicas, on one app: two model replicas that take one
request each (`max_ongoing_requests=1`), one more may queue (`max_queued_requests=1`),
overload answers 429, and an API key. Replicas are held busy by a signal actor (the
engine's admission gate), never by sleeps."""

from __future__ import annotations

import threading

import pytest
import ray
import requests
from serve_support import Gate, free_port, save_tiny_model, start_app, wait_for

from raymed.config import load_config

MODEL = "tiny"
KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def gate(ray_cluster):
    return Gate.remote()


@pytest.fixture(scope="module")
def url(ray_cluster, gate, tmp_path_factory, default_assets, monkeypatch_module):
    from ray import serve

    from raymed.serve.app import build_application

    monkeypatch_module.delenv("RAYMED_API_KEY", raising=False)
    model_dir = save_tiny_model(tmp_path_factory.mktemp("served") / MODEL,
                                default_assets / "models" / "smollm2-135m-instruct")
    config = load_config(None, [
        f"serve.model={model_dir}", "serve.num_cpus=0.5", "serve.min_replicas=2", "serve.max_replicas=2",
        "serve.max_ongoing_requests=1", "serve.max_queued_requests=1", "serve.overload_status=429",
        "serve.retry_after_s=3", f"serve.api_key={KEY}",
    ])
    yield start_app(build_application(config, admission_gate=gate), free_port())
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


ROUTES = [("GET", "/v1/models", None), ("GET", "/metrics", None),
          ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
          ("POST", "/v1/completions", {"model": MODEL, "prompt": "Hi"})]


@pytest.mark.slow
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}], ids=["none", "wrong", "no-scheme", "basic"])
def test_every_api_route_needs_the_key(url, headers):
    for method, route, body in ROUTES:
        response = requests.request(method, f"{url}{route}", json=body, headers=headers, timeout=10)
        assert response.status_code == 401, (route, response.text)
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.slow
def test_health_is_open_and_the_right_key_gets_in(url):
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    assert requests.get(f"{url}/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"] == MODEL


@pytest.mark.slow
def test_the_openai_client_sends_the_key(url):
    import openai

    assert [m.id for m in openai.OpenAI(base_url=f"{url}/v1", api_key=KEY).models.list()] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.slow
def test_metrics_show_figures_from_each_replica(url):
    def replicas_reporting():
        text = requests.get(f"{url}/metrics", headers=AUTH, timeout=10).text
        return {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("raymed_replica_queue_depth{")}

    assert len(wait_for(lambda: len(replicas_reporting()) == 2 and replicas_reporting(), timeout=60)) == 2


class _Call(threading.Thread):
    def __init__(self, url, results, name, stream=False):
        super().__init__(daemon=True)
        self.url, self.results, self.name, self.stream = url, results, name, stream

    def run(self):
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0, "stream": self.stream}
        response = requests.post(f"{self.url}/v1/completions", json=body, headers=AUTH, timeout=120)
        self.results[self.name] = response


@pytest.mark.slow
def test_overload_gets_429_with_retry_after_then_everything_queued_completes(url, gate):
    """Runs last in this module: it opens the gate for good."""
    results: dict[str, requests.Response] = {}
    holders = [_Call(url, results, f"holder{i}") for i in range(2)]
    for busy, call in enumerate(holders, start=1):  # one at a time: Serve's router may refuse
        call.start()                                  # simultaneous arrivals while one is queued
        wait_for(lambda: ray.get(gate.waiting.remote()) == busy, timeout=60)
    assert not results  # both replicas are busy, each holding one request at the gate

    # One more may queue; of two more, exactly one is refused at once (whichever came second).
    extra = [_Call(url, results, "extra0"), _Call(url, results, "extra1", stream=True)]
    for call in extra:
        call.start()
    refused_name = wait_for(lambda: next((n for n in ("extra0", "extra1") if n in results), None), timeout=60)
    refused = results[refused_name]
    assert refused.status_code == 429, refused.text
    assert refused.headers["Retry-After"] == "3"
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "overloaded"

    ray.get(gate.release.remote())
    for call in [*holders, *extra]:
        call.join(timeout=60)
    accepted = {n: r.status_code for n, r in results.items() if n != refused_name}
    assert accepted == {"holder0": 200, "holder1": 200, ({"extra0", "extra1"} - {refused_name}).pop(): 200}
    text = requests.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    assert 'raymed_requests_total{route="completions",status="429"} 1.0' in text
