"""Request and response bodies in OpenAI's shapes (chat completions and completions).

Requests are validated here: a bad field is a 400 that names it (raymed.serve.errors).
Fields OpenAI defines but raymed does not implement are refused when set to anything
but their default, rather than silently ignored.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
MaxTokens = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
"""What torch's generators accept."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    stop: str | list[str] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    """Only one choice per request."""

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    """The newer name for max_tokens (the openai client sends either)."""
    grounding: bool | None = None
    """raymed extension: `false` answers without the knowledge index (and without `citations`);
    `true` requires grounding (400 `grounding_unavailable` where the server has it off); unset:
    the server's `serve.grounding`."""

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them (`developer` is OpenAI's new `system`)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("exactly one prompt per request")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that parses its own body: the model's JSON schema as the
    required JSON request body (nested models inlined, so the schema needs no components)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(request_id: str, model: str, text: str, finish_reason: str, usage_: dict) -> dict[str, Any]:
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage_,
    }


def chat_chunk(request_id: str, model: str, delta: dict, finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def completion(request_id: str, model: str, text: str, finish_reason: str | None, usage_: dict | None) -> dict[str, Any]:
    body = {
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body


def usage_chunk(request_id: str, model: str, kind: str, usage_: dict) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, usage."""
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model,
            "choices": [], "usage": usage_}
