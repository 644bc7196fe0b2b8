"""Ray Serve under injected faults, on one real app: two model replicas of a tiny Llama,
each taking 2 requests at once (`max_ongoing_requests=2`), 2 more may wait at the ingress
(`max_queued_requests=2`), overload answers 503 with `Retry-After`.

Faults: a client that goes away mid-stream, overload at four times capacity, and a model
replica killed with requests on it. Replicas are held busy by a signal actor (the
admission gate), and every wait is a condition polled with a deadline, never a sleep.
The tests run in file order; the replica kill comes last.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import ray
import requests
from serve_support import metric, Gate, free_port, save_tiny_model, start_app, wait_for

from raymed.config import load_config

MODEL = "tiny"
REPLICAS, MAX_ONGOING, MAX_QUEUED = 2, 2, 2
CAPACITY = REPLICAS * MAX_ONGOING + MAX_QUEUED
"""Requests the app holds at once: one ingress queues `max_queued_requests` for the whole
deployment (Serve's limit is per caller), on top of what the replicas take."""
RETRY_AFTER_S = 2
CONTEXT, LONG = 16384, 16000
"""max_tokens of a stream that must still be generating when the test acts: at least half a
minute of this model's decoding on a fast core (1,900 tokens, the earlier figure, took 2.3 s,
and a fast machine finished the stream before the replica kill)."""
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def gate(ray_cluster):
    gate = Gate.remote()
    ray.get(gate.release.remote())  # open unless a test closes it
    return gate


@pytest.fixture(scope="module")
def url(ray_cluster, gate, tmp_path_factory, default_assets, monkeypatch_module):
    from ray import serve

    from raymed.serve.app import build_application

    monkeypatch_module.delenv("RAYMED_API_KEY", raising=False)
    model_dir = save_tiny_model(tmp_path_factory.mktemp("served") / MODEL,
                                default_assets / "models" / "smollm2-135m-instruct", context=CONTEXT)
    config = load_config(None, [
        f"serve.model={model_dir}", "serve.num_cpus=0.5", f"serve.min_replicas={REPLICAS}",
        f"serve.max_replicas={REPLICAS}", f"serve.max_ongoing_requests={MAX_ONGOING}",
        f"serve.max_queued_requests={MAX_QUEUED}", f"serve.max_batch_size={MAX_ONGOING}",
        "serve.overload_status=503", f"serve.retry_after_s={RETRY_AFTER_S}", "serve.default_max_tokens=8",
    ])
    yield start_app(build_application(config, admission_gate=gate), free_port())
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


# ---------------------------------------------------------------- helpers


def complete(url, max_tokens=8, **fields) -> requests.Response:
    body = {"model": MODEL, "prompt": "The patient reports chest pain and", "max_tokens": max_tokens,
            "temperature": 0, **fields}
    return requests.post(f"{url}/v1/completions", json=body, timeout=120)


def open_stream(url, max_tokens=LONG) -> tuple[requests.Response, object]:
    """A streaming completion, read up to its first generated text; returns the response
    and the iterator over its remaining SSE lines."""
    body = {"model": MODEL, "prompt": "The patient", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    response = requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=120)
    assert response.status_code == 200, response.text
    lines = response.iter_lines(decode_unicode=True)
    next(line for line in lines if line.startswith("data: ") and '"text": ""' not in line)
    return response, lines




def model_replicas() -> dict[str, ray.actor.ActorHandle]:
    """The live ModelServer replica actors, by name (`SERVE_REPLICA::raymed#ModelServer#<id>`)."""
    return {actor["name"]: ray.get_actor(actor["name"], namespace=actor["namespace"])
            for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["namespace"] == "serve" and "#ModelServer#" in actor["name"]}


def replica_pids() -> dict[str, int]:
    """Each replica's process id, as the replica reports it (Serve's `is_allocated` probe)."""
    return {name: ray.get(handle.is_allocated.remote(), timeout=30)[0] for name, handle in model_replicas().items()}


def model_deployment():
    from ray import serve

    return serve.status().applications["raymed"].deployments["ModelServer"]


def healthy_with(names: set[str]) -> bool:
    """ModelServer is healthy, with exactly these replicas running."""
    deployment = model_deployment()
    return (deployment.status == "HEALTHY" and deployment.replica_states == {"RUNNING": REPLICAS}
            and set(model_replicas()) == names)


def replaced(victim: str, before: set[str]) -> bool:
    """The victim is gone and a new replica serves in its place (serve.status lags the kill,
    so a new name is what shows the replacement)."""
    now = set(model_replicas())
    return victim not in now and len(now - before) == 1 and healthy_with(now)


def assert_openai_error(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS and error["message"]
    return error


def hold_every_replica_slot(url, gate, pool, held_by_others=0) -> list:
    """Close the gate and send requests one at a time until every replica slot holds one
    at the gate (`held_by_others` slots are already taken); returns their futures."""
    ray.get(gate.close.remote())
    holders = []
    for held in range(1, REPLICAS * MAX_ONGOING - held_by_others + 1):
        holders.append(pool.submit(complete, url))
        wait_for(lambda: ray.get(gate.waiting.remote()) == held, timeout=60)
    return holders


def one_request_per_slot(url, gate) -> list[requests.Response]:
    """Every replica slot takes a request (each held at the gate until all are placed, so a
    slot that never came back, or a replica the router does not use, would stall this);
    then the gate opens and the answers come back."""
    with ThreadPoolExecutor(REPLICAS * MAX_ONGOING) as pool:
        holders = hold_every_replica_slot(url, gate, pool)
        ray.get(gate.release.remote())
        return [f.result(timeout=120) for f in holders]


# ---------------------------------------------------------------- a client that goes away


@pytest.mark.slow
def test_a_client_gone_mid_stream_cancels_its_generation_and_frees_the_slot(url, gate):
    before = {name: metric(url, name) for name in
              ("raymed_requests_cancelled_total", "raymed_replica_cancelled_total", "raymed_replica_finished_total")}
    response, _ = open_stream(url)
    wait_for(lambda: metric(url, "raymed_replica_running") == 1, timeout=30)

    response.close()  # the client goes away after the first chunk of a 16,000-token answer

    wait_for(lambda: metric(url, "raymed_requests_cancelled_total", route="completions")
             == before["raymed_requests_cancelled_total"] + 1, timeout=30)
    wait_for(lambda: metric(url, "raymed_replica_cancelled_total")
             == before["raymed_replica_cancelled_total"] + 1, timeout=30)
    wait_for(lambda: metric(url, "raymed_replica_running") == 0 == metric(url, "raymed_replica_queue_depth"),
             timeout=30)
    assert metric(url, "raymed_replica_finished_total") == before["raymed_replica_finished_total"]
    # Serve's slot came back too: every slot of both replicas takes a request again.
    assert [r.status_code for r in one_request_per_slot(url, gate)] == [200] * REPLICAS * MAX_ONGOING


# ---------------------------------------------------------------- overload


def overload_once(url, gate) -> tuple[list[requests.Response], list[requests.Response]]:
    """4x capacity at once: every replica slot held at the gate, then the rest in one burst.
    Returns (held, burst) responses once the gate has opened and every request answered."""
    with ThreadPoolExecutor(4 * CAPACITY) as pool:
        holders = hold_every_replica_slot(url, gate, pool)
        burst = [pool.submit(complete, url) for _ in range(4 * CAPACITY - len(holders))]
        # At most MAX_QUEUED of the burst can wait; the others are refused while the gate is shut.
        wait_for(lambda: sum(f.done() for f in burst) >= len(burst) - MAX_QUEUED, timeout=60)
        refused_while_shut = [f.result() for f in burst if f.done()]
        assert {r.status_code for r in refused_while_shut} == {503}
        ray.get(gate.release.remote())
        return [f.result(timeout=120) for f in holders], [f.result(timeout=120) for f in burst]


def max_rss(pids: dict[str, int]) -> int:
    return max(psutil.Process(pid).memory_info().rss for pid in pids.values())


@pytest.mark.slow
def test_overload_at_four_times_capacity_refuses_the_excess_and_serves_the_rest(url, gate):
    pids = replica_pids()
    assert len(pids) == REPLICAS
    rss_before = max_rss(pids)

    for _ in range(3):
        held, burst = overload_once(url, gate)
        assert [r.status_code for r in held] == [200] * len(held)  # admitted requests all complete
        refused = [r for r in burst if r.status_code != 200]
        assert len(refused) >= len(burst) - MAX_QUEUED
        for response in refused:
            error = assert_openai_error(response, 503)
            assert (error["type"], error["code"]) == ("overloaded_error", "overloaded")
            assert response.headers["Retry-After"] == str(RETRY_AFTER_S)
        for response in burst:
            if response.status_code == 200:
                assert response.json()["usage"]["completion_tokens"] == 8

    assert replica_pids() == pids  # no replica crashed or restarted
    assert healthy_with(set(pids))
    growth = max_rss(pids) - rss_before
    assert growth < 200 * 2**20, f"replica RSS grew by {growth / 2**20:.0f} MB"


# ---------------------------------------------------------------- a replica killed under load


def replica_running_the_stream(url, names: set[str]) -> str | None:
    """The replica whose batch holds one sequence while the others hold none (from /metrics)."""
    running = {name: metric(url, "raymed_replica_running", replica=name.rsplit("#", 1)[-1]) for name in names}
    busy = [name for name, rows in running.items() if rows == 1]
    return busy[0] if len(busy) == 1 and sum(running.values()) == 1 else None


@pytest.mark.slow
def test_a_killed_replica_fails_only_its_own_requests_and_is_replaced(url, gate):
    before = set(model_replicas())
    # Load: a long stream generating on one replica, and every other slot held at the gate.
    stream, stream_lines = open_stream(url)
    victim = wait_for(lambda: replica_running_the_stream(url, before), timeout=30)
    with ThreadPoolExecutor(REPLICAS * MAX_ONGOING) as pool:
        holders = hold_every_replica_slot(url, gate, pool, held_by_others=1)

        ray.kill(model_replicas()[victim], no_restart=True)

        # The stream on the dead replica ends with an OpenAI error event, not a hang.
        events = [line for line in stream_lines if line.startswith("data: ")]
        assert events[-1] != "data: [DONE]"
        error = json.loads(events[-1].removeprefix("data: "))["error"]
        assert set(error) == ERROR_FIELDS and error["code"] == "replica_failed"
        stream.close()
        # So does the one held request that was on it: a 503 saying why, with Retry-After.
        failed = wait_for(lambda: [f for f in holders if f.done()], timeout=60)
        assert len(failed) == 1
        assert assert_openai_error(failed[0].result(), 503)["code"] == "replica_failed"
        assert failed[0].result().headers["Retry-After"] == str(RETRY_AFTER_S)

        # Serve replaces the replica; the requests on the survivor then complete.
        wait_for(lambda: replaced(victim, before), timeout=120)
        ray.get(gate.release.remote())
        survivors = [f.result(timeout=120) for f in holders if f is not failed[0]]
        assert [r.status_code for r in survivors] == [200] * (REPLICAS * MAX_ONGOING - 2)

    # Afterwards every request succeeds: every slot, the new replica's included, then more.
    assert [r.status_code for r in one_request_per_slot(url, gate)] == [200] * REPLICAS * MAX_ONGOING
    assert [complete(url).status_code for _ in range(REPLICAS * MAX_ONGOING)] == [200] * REPLICAS * MAX_ONGOING
