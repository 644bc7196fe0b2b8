"""Response bodies in OpenAI's shapes: chat completions, completions, their stream chunks,
and logprobs in each route's own shape.

A replica's logprob entry is `{"token": str, "logprob": float | None, "top": [[token,
logprob], ...] | None}` (raymed.serve.engine); these functions only reshape it.
"""

from __future__ import annotations

import time
from typing import Any


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(entries: list[dict] | None) -> dict | None:
    """`choices[i].logprobs` of a chat answer: `{"content": [...], "refusal": None}`."""
    if entries is None:
        return None

    def one(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**one(e["token"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"]]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list[dict] | None, text_start: int = 0) -> dict | None:
    """`choices[i].logprobs` of a completion: parallel lists, as the legacy API has them."""
    if entries is None:
        return None
    offsets, offset = [], text_start
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top"] is None else dict(e["top"]) for e in entries],
            "text_offset": offsets}


def chat_choice(index: int, text: str, finish_reason: str, logprobs: list[dict] | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason, "logprobs": chat_logprobs(logprobs)}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: list[dict] | None,
                      text_start: int = 0) -> dict:
    return {"index": index, "text": text, "finish_reason": finish_reason,
            "logprobs": completion_logprobs(logprobs, text_start)}


def chat_completion(request_id: str, model: str, choices: list[dict], usage_: dict) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_}


def completion(request_id: str, model: str, choices: list[dict], usage_: dict | None) -> dict[str, Any]:
    body = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def chat_chunk(request_id: str, model: str, index: int, delta: dict, finish_reason: str | None = None,
               logprobs: list[dict] | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason,
                         "logprobs": chat_logprobs(logprobs)}]}


def usage_chunk(request_id: str, model: str, kind: str, usage_: dict) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, usage."""
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model,
            "choices": [], "usage": usage_}
