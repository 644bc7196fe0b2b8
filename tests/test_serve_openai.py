"""The OpenAI fields raymed honours, end to end over real HTTP on a real Serve app (a tiny
random Llama whose generation_config.json carries sampling defaults), checked against the
same weights in this process; and real clients: the `openai` SDK and LangChain's ChatOpenAI.

Each honoured field has a test that fails if the field were ignored."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
import torch
from serve_support import free_port, save_tiny_model, sse_events, start_app

from raymed.config import load_config
from raymed.serve.safety import with_system_prompt

pytestmark = pytest.mark.slow

MODEL = "tiny"
GENERATION_DEFAULTS = {"temperature": 0.0, "top_p": 0.5}
"""The served model's own sampling defaults (greedy, so a request that omits temperature is
checkable against plain greedy generation)."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_assets):
    out = save_tiny_model(tmp_path_factory.mktemp("served") / MODEL, default_assets / "models" / "smollm2-135m-instruct")
    config = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**config, **GENERATION_DEFAULTS}))
    return out


@pytest.fixture(scope="module")
def url(ray_cluster, model_dir):
    from ray import serve

    from raymed.serve.app import build_application

    config = load_config(None, [f"serve.model={model_dir}", "serve.num_cpus=1", "serve.max_batch_size=8",
                                "serve.default_max_tokens=8", "serve.max_body_bytes=20000000",
                                "serve.default_repetition_penalty=1.0",
                                "serve.dtype=float32"])  # the references below are float32 `generate`
    yield start_app(build_application(config), free_port())
    serve.shutdown()


@pytest.fixture(scope="module")
def local(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0)


def post(url, route, body, stream=False):
    return requests.post(f"{url}/v1/{route}", json={"model": MODEL, **body}, timeout=120, stream=stream)


def chat_body(content="What is a fever?", **fields):
    return {"messages": [{"role": "user", "content": content}], **fields}


def chat_prompt_ids(local, content="What is a fever?"):
    messages = with_system_prompt([{"role": "user", "content": content}])
    return local[1].apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def greedy_ids(local, prompt_ids, count):
    out = local[0].generate(torch.tensor([prompt_ids]), max_new_tokens=count, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def token_logprobs(local, ids):
    """log p(ids[i] | ids[:i]) for i >= 1, from one forward pass in this process."""
    with torch.no_grad():
        logprobs = torch.log_softmax(local[0](torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]


# ---------------------------------------------------------------- models and sampling defaults


def test_models_list_and_retrieve_show_the_sampling_defaults(url, client):
    expected = {"temperature": 0.0, "top_p": 0.5, "repetition_penalty": 1.0}
    listed = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    assert listed["sampling_defaults"] == expected
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.sampling_defaults == expected
    import openai

    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_omitted_and_null_sampling_fields_take_the_models_own_defaults(url, local):
    expected = local[1].decode(greedy_ids(local, chat_prompt_ids(local), 8), skip_special_tokens=True)
    for fields in ({}, {"temperature": None, "top_p": None, "seed": 3}):
        answer = post(url, "chat/completions", chat_body(max_tokens=8, **fields)).json()
        assert answer["choices"][0]["message"]["content"] == expected  # greedy: the model's temperature 0
    sampled = {post(url, "chat/completions", chat_body(max_tokens=8, temperature=1.0, top_p=1.0, seed=s)).json()
               ["choices"][0]["message"]["content"] for s in (1, 2)}
    assert sampled != {expected}


# ---------------------------------------------------------------- n, logit_bias, penalties


def test_n_seeded_choices_differ_from_each_other_and_repeat(url):
    body = chat_body(max_tokens=10, temperature=1.0, n=2, seed=11)
    first, again = (post(url, "chat/completions", body).json() for _ in range(2))
    texts = [c["message"]["content"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1]
    assert texts[0] != texts[1]
    assert texts == [c["message"]["content"] for c in again["choices"]]
    assert first["usage"]["completion_tokens"] == 20


def test_logit_bias_of_100_makes_greedy_say_that_token(url, local):
    token = local[1](" fever", add_special_tokens=False)["input_ids"][0]
    answer = post(url, "completions", {"prompt": "Aspirin", "max_tokens": 4, "temperature": 0,
                                       "logit_bias": {str(token): 100}}).json()
    assert answer["choices"][0]["text"] == " fever" * 4
    refused = post(url, "completions", {"prompt": "Aspirin", "logit_bias": {"99999999": 1}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logit_bias"


@pytest.mark.parametrize("penalty", [{"frequency_penalty": 1.0}, {"presence_penalty": 2.0},
                                     {"repetition_penalty": 5.0}])
def test_each_penalty_breaks_a_repeat(url, local, penalty):
    """+2 on one token makes the random model repeat it (its logits span about +-0.7)."""
    token = local[1](" fever", add_special_tokens=False)["input_ids"][0]
    body = {"prompt": "Aspirin", "max_tokens": 12, "temperature": 0, "logit_bias": {str(token): 2}}
    plain = post(url, "completions", body).json()["choices"][0]["text"]
    penalised = post(url, "completions", {**body, **penalty}).json()["choices"][0]["text"]
    assert plain == " fever" * 12
    assert 1 <= penalised.count(" fever") <= 4


# ---------------------------------------------------------------- logprobs, echo, prompts


def test_chat_logprobs_are_the_models_own_and_stream_the_same(url, local):
    body = chat_body(max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    answer = post(url, "chat/completions", body).json()
    content = answer["choices"][0]["logprobs"]["content"]
    prompt_ids = chat_prompt_ids(local)
    generated = greedy_ids(local, prompt_ids, 6)
    expected = token_logprobs(local, prompt_ids + generated)[len(prompt_ids) - 1:]
    assert [e["token"] for e in content] == [local[1].decode([t]) for t in generated]
    assert [e["logprob"] for e in content] == pytest.approx(expected, abs=1e-3)
    assert all(len(e["top_logprobs"]) == 3 and e["top_logprobs"][0]["logprob"] >= e["logprob"] - 1e-6
               for e in content)
    assert all(e["bytes"] == list(e["token"].encode()) for e in content)
    chunks = sse_events(post(url, "chat/completions", {**body, "stream": True}, stream=True))
    streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    plain = post(url, "chat/completions", chat_body(max_tokens=2, temperature=0)).json()
    assert plain["choices"][0]["logprobs"] is None


def test_echo_with_zero_max_tokens_scores_the_prompt_like_the_model_in_process(url, local):
    text = "Hypertension is high blood pressure."
    ids = local[1](text)["input_ids"]
    answer = post(url, "completions", {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 2}).json()
    choice = answer["choices"][0]
    assert choice["text"] == text
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [local[1].decode([t]) for t in ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx(token_logprobs(local, ids), abs=1e-3)
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"][1:])
    assert answer["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    # echo + one generated token (what lm-eval sends): the prompt's entries, then the new token's
    more = post(url, "completions", {"prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True,
                                     "logprobs": 1}).json()["choices"][0]
    assert more["logprobs"]["token_logprobs"][:len(ids)] == pytest.approx(logprobs["token_logprobs"], abs=1e-5)
    assert len(more["logprobs"]["tokens"]) == len(ids) + 1 and more["text"].startswith(text)


def test_token_id_and_batched_prompts_answer_like_their_text(url, local):
    prompts = ["Asthma is", "Fever"]
    single = [post(url, "completions", {"prompt": p, "max_tokens": 5, "temperature": 0}).json()["choices"][0]["text"]
              for p in prompts]
    ids = [local[1](p)["input_ids"] for p in prompts]
    for prompt in (prompts, ids):
        answer = post(url, "completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0}).json()
        assert [c["index"] for c in answer["choices"]] == [0, 1]
        assert [c["text"] for c in answer["choices"]] == single
        assert answer["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
    one = post(url, "completions", {"prompt": ids[0], "max_tokens": 5, "temperature": 0}).json()
    assert one["choices"][0]["text"] == single[0]
    streamed = sse_events(post(url, "completions", {"prompt": prompts, "max_tokens": 5, "temperature": 0,
                                                    "stream": True}, stream=True))
    for index, expected in enumerate(single):
        assert "".join(c["choices"][0]["text"] for c in streamed if c["choices"][0]["index"] == index) == expected


def test_completions_keep_the_models_text_and_carry_the_banner_in_safety(url):
    red_flag = "I have crushing chest pain and I can't breathe"
    answer = post(url, "completions", {"prompt": red_flag, "max_tokens": 4, "temperature": 0}).json()
    assert answer["safety"]["red_flag"] and answer["safety"]["banner"]
    assert "emergency" not in answer["choices"][0]["text"].lower()
    chunks = sse_events(post(url, "completions", {"prompt": red_flag, "max_tokens": 4, "temperature": 0,
                                                  "stream": True}, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == answer["choices"][0]["text"]
    assert chunks[0]["safety"]["banner"] == answer["safety"]["banner"]
    chat = post(url, "chat/completions", chat_body(red_flag, max_tokens=4)).json()
    assert chat["choices"][0]["message"]["content"].startswith(chat["safety"]["banner"])


# ---------------------------------------------------------------- the event loop


def test_a_huge_prompt_does_not_stall_the_gateway(url):
    """Tokenizing a several-megabyte prompt takes seconds; it runs off the Gateway's event
    loop, so /health keeps answering quickly meanwhile."""
    huge = "fever cough headache " * 600_000
    done = {}

    def send():
        started = time.monotonic()
        done["status"] = post(url, "completions", {"prompt": huge, "max_tokens": 1}).status_code
        done["seconds"] = time.monotonic() - started

    sender = threading.Thread(target=send)
    sender.start()
    waits = []
    while sender.is_alive():
        started = time.monotonic()
        requests.get(f"{url}/health", timeout=60)
        waits.append(time.monotonic() - started)
        time.sleep(0.05)
    sender.join()
    assert done["status"] == 400  # past the context
    assert done["seconds"] > 2, "the prompt tokenized too fast to show anything"
    assert max(waits) < done["seconds"] / 2, (max(waits), done["seconds"])


# ---------------------------------------------------------------- real clients


def test_the_openai_sdk_gets_n_logprobs_batches_and_clear_refusals(client):
    import openai

    messages = [{"role": "user", "content": "Name a symptom."}]
    two = client.chat.completions.create(model=MODEL, messages=messages, n=2, temperature=1.0, seed=5, max_tokens=6)
    assert len(two.choices) == 2 and two.choices[0].message.content != two.choices[1].message.content
    scored = client.chat.completions.create(model=MODEL, messages=messages, logprobs=True, top_logprobs=2,
                                            max_tokens=4, temperature=0)
    assert len(scored.choices[0].logprobs.content) == 4
    assert len(scored.choices[0].logprobs.content[0].top_logprobs) == 2
    streamed = [entry for chunk in client.chat.completions.create(
        model=MODEL, messages=messages, logprobs=True, max_tokens=4, temperature=0, stream=True)
        if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in scored.choices[0].logprobs.content]
    batch = client.completions.create(model=MODEL, prompt=["Fever", "Cough"], max_tokens=3, temperature=0)
    assert sorted(c.index for c in batch.choices) == [0, 1]
    refusals = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                "tool_choice": "auto", "response_format": {"type": "json_object"},
                "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"},
                "frequency_penalty": 3.0}
    for name, value in refusals.items():
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, **{name: value})
        assert caught.value.body["param"].split(".")[0] == name
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="Fever", suffix="end")
    assert caught.value.body["code"] == "unsupported_parameter"


def test_langchain_chat_openai_invokes_streams_and_gets_a_clear_refusal(url):
    import openai
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    llm = ChatOpenAI(model=MODEL, base_url=f"{url}/v1", api_key="not-needed", max_tokens=6, temperature=0,
                     max_retries=0)
    answer = llm.invoke("What is a fever?")
    assert answer.content and answer.response_metadata["finish_reason"] == "length"
    assert "".join(chunk.content for chunk in llm.stream("What is a fever?")) == answer.content

    class Diagnosis(BaseModel):
        condition: str

    with pytest.raises(openai.BadRequestError) as caught:
        llm.with_structured_output(Diagnosis).invoke("What is a fever?")
    assert (caught.value.body["code"], caught.value.body["param"]) == ("unsupported_parameter", "response_format")


# ---------------------------------------------------------------- lm-evaluation-harness


MCQ_TASK = """task: raymed_mcq
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{options}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def in_process_loglikelihood(local, context: str, continuation: str) -> float:
    """log p(continuation | context), split into tokens as lm-eval splits it."""
    tokenizer = local[1]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return sum(token_logprobs(local, whole)[len(context_ids) - 1:])


@pytest.mark.parametrize("tokenized", [True, False], ids=["token-ids", "text"])
def test_lm_eval_local_completions_scores_like_the_model_in_process(url, local, model_dir, default_assets,
                                                                   tmp_path, tokenized, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    items = tmp_path / "items.jsonl"
    lines = (default_assets / "eval" / "medical-mcq-v1.jsonl").read_text().splitlines()[:4]
    items.write_text("\n".join(lines) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "raymed_mcq.yaml").write_text(MCQ_TASK.format(items=items))
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(f"model={MODEL},base_url={url}/v1/completions,tokenizer={model_dir},"
                    f"tokenizer_backend=huggingface,tokenized_requests={tokenized},batch_size=2,max_retries=1"),
        tasks=["raymed_mcq"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
    )
    samples = results["samples"]["raymed_mcq"]
    assert len(samples) == 4
    compared = 0
    for sample in samples:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
            loglikelihood = response[0][0]
            assert loglikelihood == pytest.approx(in_process_loglikelihood(local, context, continuation), abs=1e-3)
            compared += 1
    assert compared == 16
    metrics = results["results"]["raymed_mcq"]
    assert 0 <= metrics["acc,none"] <= 1 and 0 <= metrics["acc_norm,none"] <= 1
