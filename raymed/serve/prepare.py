"""Request preparation on the Gateway: from a validated body to the replicas' work orders.

`RequestPreparer.chat` is the one path a chat request takes before generation (messages,
safety check, retrieval, safety system prompt with the retrieved passages, chat template,
tokens, jobs); a step that changes what the model reads belongs there. Grounding
(raymed.serve.grounding) runs after the safety check, which reads the user's own text only. The chat template, the tokenizer
and the safety check run on a worker thread, never on the Gateway's event loop: one huge prompt must
not stall every other request's stream.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from raymed.config import ServeConfig
from raymed.serve import errors, safety
from raymed.serve.grounding import Grounder
from raymed.serve.model_source import ServedModel
from raymed.serve.protocol import ChatCompletionRequest, CompletionRequest


@dataclass
class Plan:
    """One request, ready to run: a work order per choice (`n` per prompt, in choice order)."""

    route: str
    """`chat` or `completions`."""
    request_id: str
    body: ChatCompletionRequest | CompletionRequest
    prompts: list[list[int]]
    flags: safety.SafetyCheck
    jobs: list[dict] = field(default_factory=list)
    echo_texts: list[str] = field(default_factory=list)
    """Per prompt, the text a completion with `echo` leads with ('' otherwise)."""
    grounding_marks: dict = field(default_factory=dict)
    """What grounding adds to the answer (`citations`, `grounding_warning`); empty when off."""

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompts)

    def prompt_of(self, choice: int) -> int:
        return choice // self.body.n


class RequestPreparer:
    """Builds Plans for one served model (its tokenizer, context, vocabulary and sampling defaults)."""

    def __init__(self, tokenizer, model: ServedModel, settings: ServeConfig, sampling_defaults: dict,
                 vocab_size: int, grounder: Grounder | None = None):
        self.tokenizer = tokenizer
        self.grounder = grounder or Grounder(None, settings.grounding_k)
        self.model = model
        self.settings = settings
        self.sampling_defaults = sampling_defaults
        self.vocab_size = vocab_size

    async def chat(self, body: ChatCompletionRequest, request_id: str) -> Plan:
        messages = body.chat()
        flags = await asyncio.to_thread(safety.check, [m["content"] for m in messages if m["role"] == "user"])
        grounding = await self.grounder.ground(request_id, body.grounding, messages)  # after the safety check
        prompt_ids, grounding = await asyncio.to_thread(grounding.fit, safety.with_system_prompt(messages),
                                                        self._apply_chat_template, self.model.context_length)
        plan = Plan("chat", request_id, body, [prompt_ids], flags, grounding_marks=grounding.marks())
        plan.jobs = self._jobs(plan, "messages")
        return plan

    async def completions(self, body: CompletionRequest, request_id: str) -> Plan:
        prompts = await asyncio.to_thread(self._tokenize_prompts, body.prompts())
        texts = [p for p in body.prompts() if isinstance(p, str)]
        plan = Plan("completions", request_id, body, prompts, await asyncio.to_thread(safety.check, texts))
        plan.jobs = self._jobs(plan, "prompt")
        if body.echo:
            plan.echo_texts = await asyncio.to_thread(self._echo_texts, body.prompts(), prompts)
        else:
            plan.echo_texts = [""] * len(prompts)
        return plan

    def _apply_chat_template(self, messages: list[dict]) -> list[int]:
        try:
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True)["input_ids"])
        except Exception as err:  # a template that rejects these messages (e.g. roles out of order)
            raise errors.bad_request(f"the model's chat template rejects these messages: {err}", "messages") from None

    def _tokenize_prompts(self, prompts: list[str | list[int]]) -> list[list[int]]:
        ids = []
        for prompt in prompts:
            if isinstance(prompt, str):
                ids.append(list(self.tokenizer(prompt)["input_ids"]))
                continue
            if max(prompt) >= self.vocab_size:
                raise errors.bad_request(f"token ids must be < {self.vocab_size} (the model's vocabulary). "
                                         f"Given: {max(prompt)}", param="prompt", code="invalid_value")
            ids.append(list(prompt))
        return ids

    def _echo_texts(self, prompts: list[str | list[int]], ids: list[list[int]]) -> list[str]:
        return [p if isinstance(p, str) else self.tokenizer.decode(i) for p, i in zip(prompts, ids)]

    def _jobs(self, plan: Plan, prompt_param: str) -> list[dict]:
        """The replica's work orders, after the checks OpenAI makes (lengths, n, logit_bias)."""
        body = plan.body
        if body.n > self.settings.max_n:
            raise errors.bad_request(f"`n` must be <= {self.settings.max_n}. Given: {body.n}", param="n",
                                     code="invalid_value")
        if len(plan.prompts) * body.n > self.settings.max_choices:
            raise errors.bad_request(f"at most {self.settings.max_choices} choices per request (prompts x n). "
                                     f"Given: {len(plan.prompts) * body.n}", param=prompt_param, code="invalid_value")
        bias = body.token_bias()
        if bias and max(bias) >= self.vocab_size:
            raise errors.bad_request(f"`logit_bias` token ids must be < {self.vocab_size}. Given: {max(bias)}",
                                     param="logit_bias", code="invalid_value")
        jobs = []
        for prompt_ids in plan.prompts:
            sampling = self._sampling(body, self._max_tokens(body, prompt_ids, prompt_param), bias)
            for choice in range(body.n):
                seed = None if body.seed is None else (body.seed + choice) % 2**64  # n seeded choices differ
                jobs.append({"request_id": f"{plan.request_id}-{len(jobs)}", "prompt_ids": prompt_ids,
                             "sampling": {**sampling, "seed": seed}, "echo": getattr(body, "echo", False)})
        return jobs

    def _max_tokens(self, body, prompt_ids: list[int], prompt_param: str) -> int:
        context = self.model.context_length
        if not prompt_ids:  # e.g. only control characters, which the tokenizer drops
            raise errors.bad_request("The prompt encodes to no tokens", param=prompt_param, code="empty_prompt")
        if len(prompt_ids) >= context:
            raise errors.bad_request(
                f"The prompt is {len(prompt_ids)} tokens; this model's context is {context} tokens",
                param=prompt_param, code="context_length_exceeded")
        room = context - len(prompt_ids)
        requested = body.requested_max_tokens()
        if requested is not None and requested > room:
            raise errors.bad_request(
                f"`max_tokens` must be <= {room} (context {context} minus {len(prompt_ids)} prompt tokens). "
                f"Given: {requested}", param="max_tokens", code="context_length_exceeded")
        return requested if requested is not None else min(self.settings.default_max_tokens, room)

    def _sampling(self, body, max_tokens: int, bias: dict[int, float]) -> dict:
        """SamplingParams fields: what the request says, else the model's defaults."""
        def given(name):
            value = getattr(body, name)
            return self.sampling_defaults[name] if value is None else value

        return {"max_tokens": max_tokens, "temperature": given("temperature"), "top_p": given("top_p"),
                "repetition_penalty": given("repetition_penalty"), "stop": tuple(body.stop or ()),
                "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
                "logit_bias": tuple(bias.items()), "logprobs": body.logprob_count()}
