"""Request bodies in OpenAI's shapes (chat completions and completions), validated.

One rule: every field is honoured or refused. The fields each route implements are its
request model's fields; `REFUSED_CHAT_FIELDS` / `REFUSED_COMPLETION_FIELDS` name the
OpenAI fields it does not, and a request that sets one (or a field nobody defines) gets a
400 with `code: "unsupported_parameter"` naming it. Two honoured fields are extensions,
not OpenAI's: `repetition_penalty` (vLLM's) and chat's `grounding` (raymed's: the knowledge
index, raymed.serve.grounding). `null` for an optional field means its default, as in
OpenAI's API. Validation errors are 400s that name the field (raymed.serve.errors).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raymed.serve import errors

Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
RepetitionPenalty = Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]
BiasValue = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]
MaxTokens = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
"""What torch's generators accept."""
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]

MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5

_TOOLS = "tool calling is not implemented: the model answers in text only"
_NOT_STORED = "raymed stores nothing and has no such service option"
_IDENTITY = "raymed keeps no per-user identifiers (its logs never hold personal data)"
REFUSED_CHAT_FIELDS: dict[str, str] = {
    "tools": _TOOLS, "tool_choice": _TOOLS, "functions": _TOOLS, "function_call": _TOOLS,
    "parallel_tool_calls": _TOOLS,
    "audio": "audio output is not implemented", "modalities": "only text output is implemented",
    "prediction": "predicted outputs are not implemented",
    "reasoning_effort": "the model is not a reasoning model", "verbosity": "the model has no verbosity setting",
    "web_search_options": "web search is not implemented", "moderation": "moderation is not implemented",
    "metadata": _NOT_STORED, "store": _NOT_STORED, "service_tier": _NOT_STORED,
    "prompt_cache_key": _NOT_STORED, "prompt_cache_options": _NOT_STORED, "prompt_cache_retention": _NOT_STORED,
    "user": _IDENTITY, "safety_identifier": _IDENTITY,
}
"""OpenAI chat fields raymed does not implement, with the reason the 400 gives."""
REFUSED_COMPLETION_FIELDS: dict[str, str] = {
    "best_of": "best_of is not implemented: ask for `n` choices and pick",
    "suffix": "insertion (suffix) is not implemented",
    "user": _IDENTITY,
}
"""OpenAI completions fields raymed does not implement, with the reason the 400 gives."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """The fields both routes honour."""

    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    """None: the served model's default (its generation_config.json, else serve.default_temperature)."""
    top_p: TopP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    """vLLM's extension: divides the logit of every token already in the prompt or answer (>1 discourages)."""
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, BiasValue] = Field(default_factory=dict)
    """Token id (as a string, OpenAI's JSON shape) -> a bias added to its logit."""
    stop: str | list[str] | None = None
    seed: Seed | None = None
    n: Annotated[int, Field(ge=1)] = 1
    """Choices per prompt (at most serve.max_n; checked by the Gateway)."""
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias):
        for key in bias:
            if not key.isdigit():
                raise ValueError(f"keys must be token ids; given {key[:20]!r}")
        if len(bias) > 300:
            raise ValueError("at most 300 biased tokens")
        return bias

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def token_bias(self) -> dict[int, float]:
        return {int(token): value for token, value in self.logit_bias.items()}


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


class ResponseFormat(_Body):
    type: Literal["text"]
    """Only plain text: JSON modes (json_object, json_schema) are refused (parse_request)."""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    """The newer name for max_tokens (the openai client sends either)."""
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_CHAT_TOP_LOGPROBS)] = 0
    response_format: ResponseFormat | None = None
    grounding: bool | None = None
    """raymed extension: `false` answers without the knowledge index (and without `citations`);
    `true` requires grounding (400 `grounding_unavailable` where the server has it off); unset:
    the server's `serve.grounding`."""

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top, info):
        if top and not info.data.get("logprobs"):
            raise ValueError("needs `logprobs: true`")
        return top

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        """None: no logprobs; else how many alternatives per token."""
        return self.top_logprobs if self.logprobs else None

    def chat(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them (`developer` is OpenAI's new `system`)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


Prompt = str | list[str] | TokenIds | list[TokenIds]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    """0 with `echo`: only the prompt's own token logprobs (how harnesses score)."""
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt):
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ValueError("no prompt given")
        if any(isinstance(one, str) and not one for one in prompt):
            raise ValueError("the prompt is empty")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids."""
        return self.prompt

    def logprob_count(self) -> int | None:
        return self.logprobs


def parse_request(data: Any, kind: type[_SamplingFields]):
    """The validated request, or the 400 that names the first refused, unknown or bad field."""
    if not isinstance(data, dict):
        raise errors.bad_request("The body must be a JSON object", code="invalid_json")
    refused = REFUSED_CHAT_FIELDS if kind is ChatCompletionRequest else REFUSED_COMPLETION_FIELDS
    for name, value in data.items():
        if value is not None and name in refused:
            raise errors.unsupported(name, f"`{name}` is not supported: {refused[name]}")
    response_format = data.get("response_format")
    if kind is ChatCompletionRequest and response_format is not None and response_format != {"type": "text"}:
        raise errors.unsupported("response_format", "`response_format` supports only {\"type\": \"text\"}: "
                                 "constrained JSON decoding is not implemented")
    try:
        body = kind.model_validate(data)
    except ValidationError as err:
        raise errors.from_validation_error(err, supported=sorted(kind.model_fields)) from None
    if kind is CompletionRequest and body.max_tokens == 0 and not body.echo:
        raise errors.bad_request("`max_tokens` 0 is only useful with `echo: true`. Given: 0", param="max_tokens",
                                 code="invalid_value")
    return body


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
