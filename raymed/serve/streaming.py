"""Server-sent events for a Plan: every choice's replica stream, merged as events arrive,
in OpenAI's chunk shapes (`data: {...}` lines, then `data: [DONE]`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

from raymed.serve import errors, safety
from raymed.serve.prepare import Plan
from raymed.serve.responses import chat_chunk, completion, completion_choice, usage, usage_chunk

logger = logging.getLogger("ray.serve")


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class ChunkShape:
    """Builds one choice's stream chunks in the route's shape (chat deltas or completion text)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.kind = "chat.completion.chunk" if plan.route == "chat" else "text_completion"
        self._shown = [0] * len(plan.jobs)  # characters of each choice's text so far (text_offset)

    def chunk(self, index: int, text: str, finish_reason: str | None, logprobs: list[dict] | None) -> dict:
        plan = self.plan
        if plan.route == "chat":
            return chat_chunk(plan.request_id, plan.body.model, index, {"content": text} if text else {},
                              finish_reason, logprobs)
        start, self._shown[index] = self._shown[index], self._shown[index] + len(text)
        return completion(plan.request_id, plan.body.model,
                          [completion_choice(index, text, finish_reason, logprobs, start)], None)

    def opening(self, index: int, first: dict, marks: dict) -> dict:
        """A choice's first chunk: the assistant role and the safety banner (chat), or the
        echoed prompt with its logprobs (completions); with the marks."""
        plan = self.plan
        if plan.route == "chat":
            delta = {"role": "assistant", "content": safety.banner(plan.flags)}
            return {**chat_chunk(plan.request_id, plan.body.model, index, delta), **marks}
        echoed = plan.echo_texts[plan.prompt_of(index)]
        logprobs = first.get("prompt_logprobs") if plan.body.echo else None
        if logprobs is None and plan.body.logprobs is not None:
            logprobs = []
        return {**self.chunk(index, echoed, None, logprobs), **marks}


def wanted_logprobs(plan: Plan, event: dict) -> list[dict] | None:
    return event["logprobs"] if plan.body.logprob_count() is not None else None


async def merged(streams: list, firsts: list[dict], deadline: float) -> AsyncIterator[tuple[int, dict]]:
    """(choice index, event) for every choice's events as they arrive, first events first;
    each choice's stream is read until its finish event. Raises TimeoutError at `deadline`."""
    for index, first in enumerate(firsts):
        yield index, first
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, stream):
        try:
            while True:
                event = await stream.__anext__()
                queue.put_nowait((index, event))
                if event["finish_reason"] is not None:
                    return
        except BaseException as err:  # delivered to the reader, which raises it
            queue.put_nowait((index, err))

    tasks = [asyncio.create_task(pump(i, s)) for i, (s, first) in enumerate(zip(streams, firsts))
             if first["finish_reason"] is None]
    try:
        for _ in range(len(tasks)):
            while True:
                index, item = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.perf_counter()))
                if isinstance(item, BaseException):
                    raise item
                yield index, item
                if item["finish_reason"] is not None:
                    break
    finally:
        for task in tasks:
            task.cancel()


async def sse_chunks(plan: Plan, streams: list, firsts: list[dict], marks: dict, deadline: float,
                     settings, on_finished, on_cancelled) -> AsyncIterator[str]:
    """The whole SSE body of a stream whose first events have arrived. `on_finished(completion
    tokens)` runs when every choice finished; `on_cancelled()` when the client went away."""
    shape = ChunkShape(plan)
    request_id = plan.request_id
    completion_tokens = [0] * len(streams)
    try:
        for index, first in enumerate(firsts):
            yield sse(shape.opening(index, first, marks))
        async for index, event in merged(streams, firsts, deadline):
            completion_tokens[index] = event["completion_tokens"]
            if event["finish_reason"] is not None:  # the last chunk repeats the marks (safety, citations)
                yield sse({**shape.chunk(index, event["text"], event["finish_reason"],
                                         wanted_logprobs(plan, event)), **marks})
            elif event["text"] or event["logprobs"]:
                yield sse(shape.chunk(index, event["text"], None, wanted_logprobs(plan, event)))
        on_finished(sum(completion_tokens))
        if plan.body.include_usage_in_stream():
            yield sse(usage_chunk(request_id, plan.body.model, shape.kind,
                                  usage(plan.prompt_tokens, sum(completion_tokens))))
        yield "data: [DONE]\n\n"
    except TimeoutError:
        yield sse(errors.timed_out(settings.request_timeout_s).body())
        yield "data: [DONE]\n\n"
    except StopAsyncIteration:  # the replica ended the stream without a finish event
        yield sse(errors.server_error(request_id).body())
    except (RayActorError, ReplicaUnavailableError):  # the replica died mid-stream
        logger.warning("request %s lost its model replica mid-stream", request_id, exc_info=True)
        yield sse(errors.replica_lost(request_id, settings.retry_after_s).body())
    except Exception:
        logger.exception("request %s failed mid-stream", request_id)
        yield sse(errors.server_error(request_id).body())
    except (asyncio.CancelledError, GeneratorExit):  # the client went away
        on_cancelled()
        raise
    finally:
        for stream in streams:
            stream.cancel()  # a no-op when finished; frees the slot when the client went away
