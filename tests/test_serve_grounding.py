"""Grounded answers end to end: real Ray Serve, real HTTP, a tiny random Llama and a small
knowledge index (every ICD-10-CM code) built with Ray Data in a temporary cache.

The question about a code gets that code's passage cited (JSON answer; first and last
stream chunk) and put into the prompt; `"grounding": false` gives no citations; the
Retriever scales on its own autoscaling config while the model replicas do not; identifiers
and retrieved text never reach the logs; a damaged index gives an ungrounded answer whose
warning names `raymed index build`. Modules run in file order: the damaged-index test is last.
"""

from __future__ import annotations

import io
import threading

import pytest
import requests
from serve_support import Gate, free_port, save_tiny_model, sse_events, start_app, wait_for
from test_chat import browser  # noqa: F401  (the headless Chromium fixture)

from raymed.chat import ChatClient, run_chat
from raymed.config import load_config
from raymed.index import build_index, index_rel
from raymed.serve.grounding import Grounding, with_references
from raymed.serve.safety import with_system_prompt

MODEL = "tiny"
QUESTION = "Which diagnosis is coded as E11.9 in ICD-10-CM?"
CODE_ID = "icd10cm:E11.9"
OVERRIDES = ["serve.num_cpus=1", "serve.default_max_tokens=4", "serve.grounding=true", "serve.grounding_k=2",
             "serve.retriever.min_replicas=1", "serve.retriever.max_replicas=2",
             "serve.retriever.target_ongoing_requests=1", "serve.retriever.upscale_delay_s=0",
             "serve.retriever.num_cpus=0", "index.sources=[icd10cm]", "index.name=codes"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, default_assets):
    return save_tiny_model(tmp_path_factory.mktemp("served") / MODEL,
                           default_assets / "models" / "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def index_cache(tmp_path_factory, tiny_model_dir, ray_cluster):
    """A cache holding only the test index; RAYMED_CACHE points at it for this module."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAYMED_CACHE", str(cache))
        build_index(load_config(None, OVERRIDES).index, cache)
        yield cache


@pytest.fixture(scope="module")
def config(tiny_model_dir, index_cache):
    return load_config(None, [f"serve.model={tiny_model_dir}", *OVERRIDES])


@pytest.fixture(scope="module")
def retriever_gate(ray_cluster):
    gate = Gate.remote()
    gate.release.remote()
    return gate


@pytest.fixture(scope="module")
def url(config, retriever_gate):
    from ray import serve

    from raymed.serve.app import build_application

    yield start_app(build_application(config, retriever_gate=retriever_gate), free_port())
    serve.shutdown()


def chat(url, content=QUESTION, **fields):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}
    return requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def replicas(deployment: str) -> int:
    from ray import serve

    states = serve.status().applications["raymed"].deployments[deployment].replica_states
    return sum(n for state, n in states.items() if str(state) == "RUNNING")


@pytest.mark.slow
def test_a_question_about_a_code_cites_its_passage(url):
    answer = chat(url)
    assert answer.status_code == 200, answer.text
    citations = answer.json()["citations"]
    assert citations[0]["id"] == CODE_ID and citations[0]["source"] == "ICD-10-CM E11.9"
    assert citations[0]["title"] == "Type 2 diabetes mellitus without complications"
    assert "E11.9" in citations[0]["text"] and len(citations) == 2
    assert set(citations[0]) == {"id", "source", "title", "text"}
    assert "grounding_warning" not in answer.json()

    events = sse_events(requests.post(f"{url}/v1/chat/completions", stream=True, timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "stream": True}))
    assert events[0]["citations"] == citations and events[-1]["citations"] == citations
    assert all("citations" not in e for e in events[1:-1])


@pytest.mark.slow
def test_the_passages_go_into_the_prompt(url, tiny_model_dir):
    from transformers import AutoTokenizer

    grounded, plain = chat(url).json(), chat(url, grounding=False).json()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = with_system_prompt([{"role": "user", "content": QUESTION}])
    expected = tokenizer.apply_chat_template(with_references(messages, grounded["citations"]),
                                             add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert grounded["usage"]["prompt_tokens"] == len(expected) > plain["usage"]["prompt_tokens"]


@pytest.mark.slow
def test_grounding_off_gives_no_citations(url):
    answer = chat(url, grounding=False)
    assert answer.status_code == 200, answer.text
    assert "citations" not in answer.json()
    refused = chat(url, grounding="sometimes")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "grounding"


@pytest.mark.slow
def test_raymed_chat_prints_the_citations(url):
    out = io.StringIO()
    run_chat(ChatClient(f"{url}/v1", max_tokens=4), [QUESTION], out=out)
    assert "Sources:\n[1] ICD-10-CM E11.9: Type 2 diabetes mellitus without complications" in out.getvalue()


@pytest.mark.slow
def test_the_chat_page_shows_the_citations(url, browser):  # noqa: F811
    page = browser.new_page()
    page.goto(f"{url}/")
    page.get_by_text(f"Model: {MODEL}").wait_for()
    page.fill("#prompt", QUESTION)
    page.click("#send")
    page.locator(".assistant[data-done=true]").wait_for(timeout=60_000)
    assert page.get_by_test_id("citations").is_visible()
    first = page.get_by_test_id("citation").first
    assert first.get_attribute("data-id") == CODE_ID
    assert first.inner_text() == "ICD-10-CM E11.9: Type 2 diabetes mellitus without complications"
    assert "E11.9" in first.get_attribute("title")  # the passage's text, on hover
    page.close()


def test_passages_that_do_not_fit_the_context_are_left_out(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def encode(messages):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]

    passages = [{"id": f"documents:{n}", "source": f"doc {n}", "title": "t", "text": "word " * 100} for n in range(3)]
    messages = with_system_prompt([{"role": "user", "content": QUESTION}])
    two = len(encode(with_references(messages, passages[:2])))
    ids, fitted = Grounding(True, passages).fit(messages, encode, context=2 * two)
    assert [p["id"] for p in fitted.passages] == ["documents:0", "documents:1"] and len(ids) == two
    ids, fitted = Grounding(True, passages).fit(messages, encode, context=len(encode(messages)) * 2)
    assert fitted.passages == [] and ids == encode(messages)
    assert fitted.marks() == {"citations": [], "grounding_warning": "the passages do not fit this model's context"}


@pytest.mark.slow
def test_the_retriever_scales_on_its_own_config(url, retriever_gate):
    from ray import get

    assert replicas("Retriever") == 1 and replicas("ModelServer") == 1
    get(retriever_gate.close.remote())
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(chat(url))) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: get(retriever_gate.waiting.remote()) >= 2, timeout=60)
        wait_for(lambda: replicas("Retriever") == 2, timeout=120, interval=0.5)
        assert replicas("ModelServer") == 1  # its own config (max_replicas 1) is untouched
    finally:
        get(retriever_gate.release.remote())
        for thread in threads:
            thread.join(timeout=120)
    assert [a.status_code for a in answers] == [200] * 4
    assert all(a.json()["citations"][0]["id"] == CODE_ID for a in answers)


@pytest.mark.slow
def test_identifiers_and_retrieved_text_never_reach_logs(url):
    from security.test_identifiers_in_logs import IDENTIFIERS, PATIENT, read_logs, session_logs_dir

    answer = chat(url, PATIENT + " " + QUESTION)
    assert answer.status_code == 200 and answer.json()["citations"][0]["id"] == CODE_ID
    passage_text = answer.json()["citations"][0]["text"]
    completion_id = answer.json()["id"]
    logs_dir = session_logs_dir()
    wait_for(lambda: completion_id in "\n".join(read_logs(logs_dir / "serve").values()), timeout=60, interval=0.5)
    logs = read_logs(logs_dir)
    leaks = {(path.name, kind) for path, text in logs.items()
             for kind, secret in [*IDENTIFIERS.items(), ("passage", passage_text)] if secret in text}
    assert not leaks


@pytest.mark.slow
def test_a_damaged_index_answers_ungrounded_with_a_warning(url, config, index_cache):
    from ray import serve

    from raymed.serve.app import build_application

    passages = index_cache / index_rel("codes") / "shard-000" / "passages.jsonl"
    passages.write_bytes(passages.read_bytes()[:-10])
    serve.run(build_application(config), name="raymed", route_prefix="/")  # a redeploy: the index is loaded again
    answer = chat(url)
    assert answer.status_code == 200, answer.text
    assert answer.json()["citations"] == []
    assert "raymed index build" in answer.json()["grounding_warning"]
    assert "truncated" in answer.json()["grounding_warning"]
