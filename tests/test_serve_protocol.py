"""The request rule, checked without a server: every field the pinned `openai` SDK can send
is honoured (a field of the request model) or refused (400 `unsupported_parameter` naming
it); unknown fields are refused too; `null` means the field's default."""

from __future__ import annotations

import inspect

import pytest

from raymed.serve.errors import APIError
from raymed.serve.protocol import (
    REFUSED_CHAT_FIELDS,
    REFUSED_COMPLETION_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)

NOT_BODY_FIELDS = {"self", "extra_headers", "extra_query", "extra_body", "timeout"}
"""The SDK methods' arguments that shape the HTTP call, not the JSON body."""
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
COMPLETION = {"model": "m", "prompt": "Hi"}


def sdk_fields(resource) -> set[str]:
    return set(inspect.signature(resource.create).parameters) - NOT_BODY_FIELDS


def sdk_routes():
    from openai.resources.chat.completions import Completions as Chat
    from openai.resources.completions import Completions

    return [(Chat, ChatCompletionRequest, REFUSED_CHAT_FIELDS), (Completions, CompletionRequest,
                                                                 REFUSED_COMPLETION_FIELDS)]


@pytest.mark.parametrize("route", [0, 1], ids=["chat.completions.create", "completions.create"])
def test_every_field_the_sdk_sends_is_honoured_or_refused(route):
    resource, request, refused = sdk_routes()[route]
    fields = sdk_fields(resource)
    assert {"model", "temperature", "stream"} <= fields  # the enumeration sees the real signature
    honoured = set(request.model_fields)
    assert not honoured & set(refused), "a field is both honoured and refused"
    assert fields - honoured - set(refused) == set(), "new SDK fields: honour or refuse them"
    assert set(refused) <= fields, "refused fields the SDK does not know: a typo?"


@pytest.mark.parametrize("name", sorted(REFUSED_CHAT_FIELDS))
def test_each_refused_chat_field_is_a_400_naming_it(name):
    with pytest.raises(APIError) as caught:
        parse_request({**CHAT, name: "auto" if name != "tools" else [{"type": "function"}]}, ChatCompletionRequest)
    assert (caught.value.status, caught.value.code, caught.value.param) == (400, "unsupported_parameter", name)
    assert "not supported" in caught.value.message


@pytest.mark.parametrize("name", sorted(REFUSED_COMPLETION_FIELDS))
def test_each_refused_completion_field_is_a_400_naming_it(name):
    with pytest.raises(APIError) as caught:
        parse_request({**COMPLETION, name: 2}, CompletionRequest)
    assert (caught.value.code, caught.value.param) == ("unsupported_parameter", name)


@pytest.mark.parametrize(("body", "kind", "param"), [
    ({**CHAT, "temprature": 0.5}, ChatCompletionRequest, "temprature"),
    ({**COMPLETION, "top_k": 5}, CompletionRequest, "top_k"),
    ({**CHAT, "response_format": {"type": "json_object"}}, ChatCompletionRequest, "response_format"),
    ({**CHAT, "messages": [{"role": "user", "content": "x", "name": "ann"}]}, ChatCompletionRequest,
     "messages.0.name"),
    ({**CHAT, "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": True}},
     ChatCompletionRequest, "stream_options.include_obfuscation"),
    ({**CHAT, "messages": [{"role": "assistant", "content": "x", "tool_calls": []}]}, ChatCompletionRequest,
     "messages.0.tool_calls"),
])
def test_unknown_and_unsupported_values_are_refused(body, kind, param):
    with pytest.raises(APIError) as caught:
        parse_request(body, kind)
    assert (caught.value.param, caught.value.status, caught.value.code) == (param, 400, "unsupported_parameter")


def test_an_unknown_field_error_lists_what_is_supported():
    with pytest.raises(APIError) as caught:
        parse_request({**CHAT, "temprature": 0.5}, ChatCompletionRequest)
    assert "temperature" in caught.value.message and "top_logprobs" in caught.value.message


def test_null_means_the_default_for_every_optional_field():
    optional = {name for name, field in ChatCompletionRequest.model_fields.items() if not field.is_required()}
    body = parse_request({**CHAT, **{name: None for name in optional}, **{name: None for name in REFUSED_CHAT_FIELDS}},
                         ChatCompletionRequest)
    assert body == ChatCompletionRequest.model_validate(CHAT)
    assert body.temperature is None and body.n == 1 and body.logprob_count() is None  # None: the model's default
    body = parse_request({**COMPLETION, "echo": None, "logprobs": None, "best_of": None, "suffix": None},
                         CompletionRequest)
    assert body == CompletionRequest.model_validate(COMPLETION)


def test_text_response_format_and_include_usage_are_honoured():
    body = parse_request({**CHAT, "response_format": {"type": "text"}, "stream": True,
                          "stream_options": {"include_usage": True}}, ChatCompletionRequest)
    assert body.include_usage_in_stream()


@pytest.mark.parametrize(("prompt", "expected"), [
    ("Hi", ["Hi"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_prompts_may_be_text_token_ids_or_batches_of_either(prompt, expected):
    assert parse_request({**COMPLETION, "prompt": prompt}, CompletionRequest).prompts() == expected


@pytest.mark.parametrize(("fields", "param"), [
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"word": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"n": 0}, "n"),
])
def test_honoured_fields_check_their_ranges(fields, param):
    with pytest.raises(APIError) as caught:
        parse_request({**CHAT, **fields}, ChatCompletionRequest)
    assert caught.value.param == param and caught.value.code == "invalid_value"


def test_completion_limits():
    for fields, param in (({"logprobs": 6}, "logprobs"), ({"max_tokens": 0}, "max_tokens"), ({"prompt": []}, "prompt"),
                          ({"prompt": [[1], []]}, "prompt.list[list[int]].1")):
        with pytest.raises(APIError) as caught:
            parse_request({**COMPLETION, **fields}, CompletionRequest)
        assert caught.value.param.startswith(param.split(".")[0])
    assert parse_request({**COMPLETION, "max_tokens": 0, "echo": True, "logprobs": 1}, CompletionRequest).echo


def test_grounding_is_an_honoured_chat_extension():
    assert "grounding" in ChatCompletionRequest.model_fields and "grounding" not in REFUSED_CHAT_FIELDS
    assert parse_request({**CHAT, "grounding": False}, ChatCompletionRequest).grounding is False
    assert parse_request({**CHAT, "grounding": None}, ChatCompletionRequest).grounding is None
    with pytest.raises(APIError) as caught:
        parse_request({**COMPLETION, "grounding": False}, CompletionRequest)
    assert (caught.value.param, caught.value.code) == ("grounding", "unsupported_parameter")
