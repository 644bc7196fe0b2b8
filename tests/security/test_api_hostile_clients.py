"""The HTTP API against hostile clients, on one real Serve app with an API key:

- a fuzzer (schemathesis) sends requests generated from the app's own OpenAPI schema,
  bodies that fit it and bodies that break it: no answer is a 5xx, and every error is in
  OpenAI's shape;
- every route the app declares (enumerated from the app itself) answers 401 without the key
  and with a wrong one, except an explicit allow-list: /health and the chat page's static
  files.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from serve_support import free_port, save_tiny_model, start_app

from raymed.config import load_config

MODEL = "tiny"
KEY = "fuzz-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
ERROR_FIELDS = {"message", "type", "param", "code"}
FUZZ_CASES_PER_ROUTE = 150
FUZZ_MAX_TOKENS = 8
"""The generated bodies ask for at most this many tokens (the schema's own bound is the
model's context), so the fuzzer spends its time on inputs, not on generation."""


@pytest.fixture(scope="module")
def url(ray_cluster, tmp_path_factory, default_assets, monkeypatch_module):
    from ray import serve

    from raymed.serve.app import build_application

    monkeypatch_module.delenv("RAYMED_API_KEY", raising=False)
    model_dir = save_tiny_model(tmp_path_factory.mktemp("served") / MODEL,
                                default_assets / "models" / "smollm2-135m-instruct")
    config = load_config(None, [f"serve.model={model_dir}", "serve.num_cpus=1", "serve.max_batch_size=8",
                                "serve.default_max_tokens=4", f"serve.api_key={KEY}"])
    yield start_app(build_application(config), free_port())
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


# ---------------------------------------------------------------- fuzzing from the OpenAPI schema


def fuzzing_schema() -> dict:
    """The app's OpenAPI schema, with `model` fixed to the served name (so bodies that fit
    reach the model) and generation lengths capped (FUZZ_MAX_TOKENS)."""
    from raymed.serve.app import api

    schema = copy.deepcopy(api.openapi())
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["required"][0] == "model", "the request bodies are in the schema"
        body["properties"]["model"] = {"type": "string", "enum": [MODEL]}
        for field in ("max_tokens", "max_completion_tokens"):
            if field in body["properties"]:
                body["properties"][field] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": FUZZ_MAX_TOKENS},
                                                       {"type": "null"}]}
    return schema


schema = schemathesis.openapi.from_dict(fuzzing_schema())
FUZZ_OUTCOMES: Counter[tuple[str, int]] = Counter()
"""(path, status) of every fuzzed request, for the check that the fuzzer reached the model."""


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=FUZZ_CASES_PER_ROUTE, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_5xx_and_errors_are_openai_shaped(case, url):
    response = case.call(base_url=url, headers=AUTH, timeout=60)
    FUZZ_OUTCOMES[(case.operation.path, response.status_code)] += 1
    assert response.status_code < 500, (case.as_curl_command(), response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == ERROR_FIELDS and error["message"], (case.as_curl_command(), response.text)
    elif response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), (case.as_curl_command(), response.text)


FOUND_BY_THE_FUZZER = [
    # (id, route, body fields, status, param): each was a 500 (and failed its batch-mates) before
    ("prompt-of-control-characters", "/v1/completions", {"prompt": "\x06"}, 400, "prompt"),
    ("smallest-temperature", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "Hi"}], "temperature": 5e-324}, 200, None),
    ("seed-below-torch-range", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "Hi"}], "seed": -(2**63) - 1}, 400, "seed"),
    ("seed-above-torch-range", "/v1/completions", {"prompt": "Hi", "seed": 2**64}, 400, "seed"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("route", "fields", "status", "param"), [case[1:] for case in FOUND_BY_THE_FUZZER],
                         ids=[case[0] for case in FOUND_BY_THE_FUZZER])
def test_inputs_the_fuzzer_found_are_answered_cleanly(url, route, fields, status, param):
    body = {"model": MODEL, "max_tokens": 2, **fields}
    response = requests.post(f"{url}{route}", json=body, headers=AUTH, timeout=60)
    assert response.status_code == status, response.text
    if status != 200:
        error = response.json()["error"]
        assert set(error) == ERROR_FIELDS and error["param"] == param


@pytest.mark.slow
def test_the_fuzzer_reached_the_model_and_the_validation(url):
    """Runs after the fuzzing: bodies that fit the schema were answered (200) on both
    generation routes, and bodies that break it were refused (400), so the run above
    exercised the model and the error paths rather than, say, only 404s."""
    if not FUZZ_OUTCOMES:
        pytest.skip("runs after test_fuzzed_requests_never_get_a_5xx_and_errors_are_openai_shaped")
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert FUZZ_OUTCOMES[(path, 200)] > 0 and FUZZ_OUTCOMES[(path, 400)] > 0, dict(FUZZ_OUTCOMES)


# ---------------------------------------------------------------- auth on every route


def app_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the app declares, walked from the FastAPI app itself
    (Serve wraps its router, so included routers are followed too)."""
    from starlette.routing import Route

    from raymed.serve.app import api

    def walk(routes):
        for route in routes:
            if hasattr(route, "original_router"):
                yield from walk(route.original_router.routes)
            elif isinstance(route, Route):
                yield from ((method, route.path) for method in route.methods - {"HEAD"})
            else:
                raise AssertionError(f"a route this test does not know how to check: {route!r}")

    return set(walk(api.routes))


def open_paths() -> set[str]:
    """Paths served without the key: /health, and the chat page (/ and its static files)."""
    import raymed.serve.app

    static = Path(raymed.serve.app.__file__).parent / "static"
    pages = {"/"} | {f"/{file.name}" for file in static.iterdir()} if static.is_dir() else set()
    return {"/health"} | pages


@pytest.mark.slow
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}], ids=["no-key", "wrong-key"])
def test_every_route_but_the_open_ones_needs_the_key(url, headers):
    from raymed.serve.app import api

    routes = app_routes()
    assert {path for _, path in routes} >= set(api.openapi()["paths"]) >= {"/health", "/v1/models",
                                                                          "/v1/chat/completions", "/metrics"}
    for method, path in sorted(routes):
        response = requests.request(method, f"{url}{path}", json={"model": MODEL, "prompt": "Hi"},
                                    headers=headers, timeout=30)
        if path in open_paths():
            assert response.status_code == 200, (method, path, response.text)
            continue
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["WWW-Authenticate"] == "Bearer"
