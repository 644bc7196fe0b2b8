"""The Serve app end to end: real Ray Serve, real HTTP, a tiny random Llama on disk.

One app for the module (one model replica, batches of up to 8, two Gateway replicas, no
API key); see test_serve_overload.py for auth, back-pressure and several model replicas.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
import torch
from serve_support import metric, save_tiny_model, sse_events, start_app, wait_for, free_port

from raymed.config import load_config
from raymed.serve.safety import with_system_prompt

MODEL = "tiny"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, default_assets):
    return save_tiny_model(tmp_path_factory.mktemp("served") / MODEL,
                           default_assets / "models" / "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def url(ray_cluster, tiny_model_dir):
    from ray import serve

    from raymed.serve.app import build_application

    config = load_config(None, [f"serve.model={tiny_model_dir}", "serve.num_cpus=1", "serve.max_batch_size=8",
                                "serve.default_max_tokens=16", "serve.max_body_bytes=100000",
                                "serve.dtype=float32",  # the reference below is float32 `generate`
                                "serve.gateway_replicas=2"])
    yield start_app(build_application(config), free_port())
    serve.shutdown()


@pytest.fixture(scope="module")
def local_model(tiny_model_dir):
    """The same weights in this process, for plain `generate` as the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def chat(url, content="What is a fever?", **fields):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}
    return requests.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def complete(url, prompt="Hypertension is", **fields):
    return requests.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, **fields}, timeout=60)


def stream(url, route, body):
    response = requests.post(f"{url}{route}", json={**body, "stream": True}, stream=True, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return sse_events(response)


def greedy_reference(local_model, prompt_ids, max_tokens):
    model, tokenizer = local_model
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


# ---------------------------------------------------------------- routes


@pytest.mark.slow
def test_health_and_models(url):
    assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    models = requests.get(f"{url}/v1/models", timeout=10).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == 2048


@pytest.mark.slow
def test_chat_answer_is_plain_greedy_generate_with_usage(url, local_model):
    response = chat(url, max_tokens=12, temperature=0)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert response.headers["x-request-id"]  # Serve's request id, also on every log line of the request
    messages = with_system_prompt([{"role": "user", "content": "What is a fever?"}])  # the safety layer's
    prompt_ids = local_model[1].apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == greedy_reference(local_model, prompt_ids, 12)
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 12,
                             "total_tokens": len(prompt_ids) + 12}


@pytest.mark.slow
def test_completion_without_max_tokens_uses_the_configured_default(url, local_model):
    body = complete(url, temperature=0).json()
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 16
    prompt_ids = local_model[1]("Hypertension is")["input_ids"]
    assert body["choices"][0]["text"] == greedy_reference(local_model, prompt_ids, 16)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_stream_reassembles_to_the_non_streaming_answer(url, route):
    body = {"model": MODEL, "max_tokens": 20, "temperature": 0}
    body |= {"messages": [{"role": "user", "content": "Name a symptom."}]} if "chat" in route else {"prompt": "Asthma"}
    whole = requests.post(f"{url}{route}", json=body, timeout=60).json()
    events = stream(url, route, {**body, "stream_options": {"include_usage": True}})
    *chunks, usage_chunk = events
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert len({c["id"] for c in events}) == 1
    if "chat" in route:
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        expected = whole["choices"][0]["message"]["content"]
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
        expected = whole["choices"][0]["text"]
    assert len(chunks) > 3  # token by token, not one lump
    assert text == expected
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.slow
def test_seed_makes_sampling_repeatable(url):
    def sample(seed):
        return complete(url, max_tokens=12, temperature=1.0, top_p=0.9, seed=seed).json()["choices"][0]["text"]

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1


@pytest.mark.slow
def test_stop_sequence_ends_the_answer_before_it(url):
    full = complete(url, max_tokens=16, temperature=0).json()["choices"][0]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    body = complete(url, max_tokens=16, temperature=0, stop=[stop]).json()
    assert body["choices"][0]["text"] == full[: full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    streamed = stream(url, "/v1/completions", {"model": MODEL, "prompt": "Hypertension is", "max_tokens": 16,
                                               "temperature": 0, "stop": stop})
    assert "".join(c["choices"][0]["text"] for c in streamed) == full[: full.index(stop)]


@pytest.mark.slow
def test_the_official_openai_client_works_unchanged(url):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 8
    pieces = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=8, temperature=0, stream=True)
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == answer.choices[0].message.content
    text = client.completions.create(model=MODEL, prompt="Aspirin", max_tokens=5, temperature=0)
    assert text.usage.completion_tokens == 5
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=5)


# ---------------------------------------------------------------- continuous batching and cancellation


class _StreamReader(threading.Thread):
    """Reads an SSE response in the background, noting when each event arrived."""

    def __init__(self, response):
        super().__init__(daemon=True)
        self.response = response
        self.events = 0
        self.finished_at = None

    def run(self):
        try:
            for line in self.response.iter_lines(decode_unicode=True):
                if line == "data: [DONE]":
                    self.finished_at = time.monotonic()
                elif line.startswith("data: "):
                    self.events += 1
        except Exception:  # the test closes the connection on purpose
            pass




@pytest.mark.slow
def test_a_late_request_joins_the_running_batch_and_a_gone_client_frees_its_slot(url):
    long_body = {"model": MODEL, "prompt": "The patient", "max_tokens": 1800, "temperature": 0, "stream": True}
    long_response = requests.post(f"{url}/v1/completions", json=long_body, stream=True, timeout=120)
    reader = _StreamReader(long_response)
    reader.start()
    wait_for(lambda: reader.events >= 3, timeout=60)
    cancelled_before = metric(url, "raymed_replica_cancelled_total")

    short = stream(url, "/v1/completions", {"model": MODEL, "prompt": "Fever", "max_tokens": 2, "temperature": 0})
    short_done = time.monotonic()
    assert short[-1]["choices"][0]["finish_reason"] == "length"
    assert reader.finished_at is None, "the short request waited for the long batch to finish"
    # Both were decoded together at least once: a step with 2 rows (figures arrive within a second).
    wait_for(lambda: metric(url, "raymed_replica_batch_size_bucket", le=1)
             < metric(url, "raymed_replica_batch_size_bucket", le=2), timeout=10)

    long_response.close()  # the client goes away mid-generation
    wait_for(lambda: metric(url, "raymed_replica_cancelled_total") == cancelled_before + 1, timeout=30)
    assert reader.finished_at is None or reader.finished_at > short_done
    wait_for(lambda: metric(url, "raymed_replica_running") == 0, timeout=30)


# ---------------------------------------------------------------- bad input: an OpenAI-shaped 4xx, never a 5xx


GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


def _without(body, key):
    return {k: v for k, v in body.items() if k != key}


BAD_REQUESTS = [
    # (id, route, raw body or dict, status, param)
    ("bad-json", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None),
    ("not-an-object", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("no-messages", "/v1/chat/completions", _without(GOOD_CHAT, "messages"), 400, "messages"),
    ("no-model", "/v1/chat/completions", _without(GOOD_CHAT, "model"), 400, "model"),
    ("empty-messages", "/v1/chat/completions", {**GOOD_CHAT, "messages": []}, 400, "messages"),
    ("unknown-role", "/v1/chat/completions", {**GOOD_CHAT, "messages": [{"role": "wizard", "content": "x"}]},
     400, "messages.0.role"),
    ("prompt-too-long", "/v1/chat/completions",
     {**GOOD_CHAT, "messages": [{"role": "user", "content": "fever " * 2100}]}, 400, "messages"),
    ("max-tokens-zero", "/v1/chat/completions", {**GOOD_CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-past-context", "/v1/chat/completions", {**GOOD_CHAT, "max_tokens": 5000}, 400, "max_tokens"),
    ("max-tokens-not-a-number", "/v1/chat/completions", {**GOOD_CHAT, "max_tokens": "lots"}, 400, "max_tokens"),
    ("temperature-negative", "/v1/chat/completions", {**GOOD_CHAT, "temperature": -0.1}, 400, "temperature"),
    ("temperature-too-high", "/v1/chat/completions", {**GOOD_CHAT, "temperature": 2.5}, 400, "temperature"),
    ("temperature-nan", "/v1/chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', 400, "temperature"),
    ("top-p-zero", "/v1/chat/completions", {**GOOD_CHAT, "top_p": 0}, 400, "top_p"),
    ("top-p-nan", "/v1/completions", b'{"model": "tiny", "prompt": "Hi", "top_p": NaN}', 400, "top_p"),
    ("too-many-choices", "/v1/chat/completions", {**GOOD_CHAT, "n": 5}, 400, "n"),
    ("five-stops", "/v1/chat/completions", {**GOOD_CHAT, "stop": list("abcde")}, 400, "stop"),
    ("no-prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("empty-prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("unknown-model", "/v1/chat/completions", {**GOOD_CHAT, "model": "gpt-4o"}, 404, "model"),
    ("unknown-model-completions", "/v1/completions", {"model": "nope", "prompt": "Hi"}, 404, "model"),
    ("oversized-body", "/v1/chat/completions",
     {**GOOD_CHAT, "messages": [{"role": "user", "content": "x" * 200_000}]}, 413, None),
]


@pytest.mark.slow
@pytest.mark.parametrize(("route", "body", "status", "param"), [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_gets_an_openai_error(url, route, body, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = requests.post(f"{url}{route}", data=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


@pytest.mark.slow
def test_wrong_method_and_unknown_route_are_openai_errors_too(url):
    for response in (requests.get(f"{url}/v1/chat/completions", timeout=10),
                     requests.post(f"{url}/v1/embeddings", json={}, timeout=10)):
        assert response.status_code in (404, 405)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.slow
def test_metrics_count_requests_tokens_and_latency(url):
    chat(url, max_tokens=4, temperature=0)
    stream(url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                         "max_tokens": 4, "temperature": 0})  # TTFT is observed on streams
    # the Gateway replica that answers the scrape may not be the one that served: it adds in
    # the other's figures as last pushed (every second)
    wait_for(lambda: metric(url, "raymed_time_to_first_token_seconds_count") >= 1, timeout=30)
    text = requests.get(f"{url}/metrics", timeout=10).text
    assert 'raymed_requests_total{route="chat",status="200"}' in text
    assert "raymed_request_latency_seconds_bucket" in text
    assert metric(url, "raymed_completion_tokens_total") >= 4
    # replicas report their counters periodically, so a fresh app shows them a little later
    wait_for(lambda: metric(url, "raymed_replica_generated_tokens_total") >= 4, timeout=30)


@pytest.mark.slow
def test_the_load_benchmark_measures_the_endpoint(url):
    import argparse
    import asyncio
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    prompts = bench.load_prompts(4, min_chars=200, max_chars=400)
    assert all(200 <= len(p) <= 400 for p in prompts)
    for stream in (True, False):
        args = argparse.Namespace(url=url, api_key=None, max_tokens=4, warmup=1, stream=stream, temperature=0.7,
                                  top_p=0.9, logprobs=2, penalties=0.5, grounding=None,
                                  sampled_share=0.5 if stream else 0.0)
        level = asyncio.run(bench.run_level(args, MODEL, prompts, concurrency=2))
        assert (level["ok"], level["errors"]) == (4, {})
        assert level["generated_tokens"] == 16 and level["generated_tokens_per_s"] > 0
        assert 0 < level["ttft_s"]["p50"] <= level["e2e_s"]["p50"]


def test_the_load_benchmark_compares_each_variant_with_the_greedy_level_before_it():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    levels = [{"variant": v, "concurrency": 16, "generated_tokens_per_s": t}
              for v, t in (("greedy", 40), ("sampled", 30), ("logprobs", 20), ("greedy", 30), ("sampled", 30))]
    assert bench.vs_greedy(levels) == {"sampled @ 16": [0.75, 1.0], "logprobs @ 16": [0.5]}
    args = bench._parser().parse_args(["--temperature", "0.7", "--top-p", "0.9", "--logprobs", "5", "--penalties", "0.5"])
    assert bench.sampling_fields(args) == {"temperature": 0.7, "top_p": 0.9, "logprobs": True, "top_logprobs": 5,
                                           "frequency_penalty": 0.5}
    assert [bench.is_sampled(i, 0.25) for i in range(8)] == [False, False, False, True] * 2
    assert [bench.is_sampled(i, 0.5) for i in range(4)] == [False, True, False, True]
    assert not any(bench.is_sampled(i, 0.0) for i in range(8)) and all(bench.is_sampled(i, 1.0) for i in range(8))
    assert bench.sampling_fields(bench._parser().parse_args(["--grounding", "false"])) == {
        "temperature": 0, "grounding": False}
    latency = [{"variant": v, "concurrency": 16, "e2e_s": {"p50": e}, "ttft_s": {"p50": t}}
               for v, e, t in (("ungrounded", 10.0, 2.0), ("grounded", 30.0, 14.0))]
    assert bench.grounded_vs_ungrounded(latency) == {"16": {"e2e_s": 3.0, "ttft_s": 7.0}}


@pytest.mark.slow
def test_two_gateway_replicas_share_the_requests_and_metrics_sum_them(url):
    from ray import serve

    gateway = serve.status().applications["raymed"].deployments["Gateway"]
    assert gateway.replica_states.get("RUNNING") == 2
    store = serve.get_deployment_handle("MetricsStore", "raymed")

    def reported() -> list[float]:
        """/v1/models requests by Gateway replica, as each last pushed them."""
        return [sum(s.value for family in families if family.name == "raymed_requests"
                    for s in family.samples if s.labels.get("route") == "models")
                for families in store.ingress.remote("nobody").result()]

    def settled() -> list[float]:
        """[the pushed total] once every replica that answers a scrape agrees with it (each
        has pushed all it served); [] before."""
        total = sum(reported())
        scrapes = [metric(url, "raymed_requests_total", route="models") for _ in range(4)]
        return [total] if scrapes == [total] * 4 else []

    before, = wait_for(settled)
    for _ in range(30):
        assert requests.get(f"{url}/v1/models", timeout=10).status_code == 200
    # both replicas served some (the proxy spreads requests over them) and pushed them ...
    assert wait_for(lambda: len(counts := reported()) == 2 and all(counts) and sum(counts) == before + 30)
    # ... and then a scrape, whichever replica answers it, counts every request once
    assert settled() == [before + 30]
