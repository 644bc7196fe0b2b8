"""Continuous batching on one replica: one decode loop over a batched, left-padded KV cache.

Requests wait in a queue; between decode steps the loop prefills the newcomers (as one
left-padded batch), merges their cache rows into the running batch, and drops the rows of
finished or cancelled requests. So a request that arrives while a long batch decodes gets
its first token after one prefill, not after the batch ends.

The loop is one asyncio task per replica; each model step runs on a single worker thread,
so the event loop keeps accepting requests and streaming tokens while torch computes.
Every request reads its tokens from its own asyncio queue.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("ray.serve")

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples: temperature 0 is greedy; a seed makes sampling repeatable."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """What a request's stream yields: new text since the last event, the completion's
    token count so far, and the finish reason on the last event (`stop` or `length`)."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None


@dataclass
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    emitted_text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False

    @property
    def position(self) -> int:
        """Position id of the last generated token (the one fed to the next step)."""
        return len(self.prompt_ids) + len(self.generated) - 1


class BatchingEngine:
    """Generates for many requests at once on one model; see the module docstring."""

    def __init__(self, model, tokenizer, *, max_batch_size: int, context_length: int,
                 eos_token_ids: set[int], on_step: Callable[[], None] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.context_length = context_length
        self.eos_token_ids = eos_token_ids
        self.on_step = on_step
        self.stats = EngineStats()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raymed-decode")
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns).
        parameters = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"

    # ---- the request side (event loop) ----

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Stream one request's tokens. Closing the iterator early (a client that went away)
        cancels the request: its row leaves the batch at the next step."""
        if not prompt_ids:  # refused here, before it could fail the whole batch's step
            raise ValueError(f"request {request_id} has an empty prompt")
        seq = _Sequence(request_id, list(prompt_ids), params, asyncio.Queue(), _generator(params.seed))
        self._waiting.append(seq)
        self.stats.waiting = len(self._waiting)
        self._ensure_loop()
        self._wake.set()
        try:
            while True:
                event = await seq.queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if seq.finish_reason is None and not seq.cancelled:
                seq.cancelled = True
                self.stats.cancelled += 1
                logger.info("request %s cancelled after %d tokens", request_id, len(seq.generated))
                self._wake.set()

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._decode_loop())

    async def _decode_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting and not self._running:
                self._wake.clear()
                await self._wake.wait()
                continue
            newcomers = self._admit()
            try:
                outputs = await loop.run_in_executor(self._executor, self._step, newcomers)
            except Exception as err:  # a model failure fails the requests in flight, not the replica
                logger.exception("decode step failed")
                self._fail_all(err, newcomers)
                continue
            for seq, event in outputs:
                seq.queue.put_nowait(event)
            if self.on_step is not None:
                self.on_step()

    def _admit(self) -> list[_Sequence]:
        """Take waiting requests into the batch while it has room (dropping cancelled ones)."""
        free = self.max_batch_size - len(self._running)
        newcomers = []
        while self._waiting and len(newcomers) < free:
            seq = self._waiting.popleft()
            if not seq.cancelled:
                newcomers.append(seq)
        self.stats.waiting = len(self._waiting)
        return newcomers

    def _fail_all(self, err: Exception, newcomers: list[_Sequence]) -> None:
        for seq in [*self._running, *newcomers]:
            seq.finish_reason = "error"
            seq.queue.put_nowait(err)
        self._running, self._cache, self._mask = [], None, None
        self.stats.running = 0

    # ---- the model side (the decode thread) ----

    @torch.inference_mode()
    def _step(self, newcomers: list[_Sequence]) -> list[tuple[_Sequence, TokenEvent]]:
        """One unit of work: prefill the newcomers if there are any, else one decode step
        for the running batch. Returns the events to deliver."""
        started = time.perf_counter()
        self._drop_rows(lambda seq: seq.cancelled)
        outputs = []
        if newcomers:
            outputs = self._advance_all(newcomers, self._prefill(newcomers))
        elif self._running:
            self.stats.observe_batch(len(self._running))
            outputs = self._advance_all(self._running, self._decode())
        self._drop_rows(lambda seq: seq.finish_reason is not None)
        self.stats.running = len(self._running)
        self.stats.step_seconds += time.perf_counter() - started
        return outputs

    def _advance_all(self, rows: list[_Sequence], logits: torch.Tensor) -> list[tuple[_Sequence, TokenEvent]]:
        events = ((seq, self._advance(seq, token)) for seq, token in zip(rows, self._sample(logits, rows)))
        return [(seq, event) for seq, event in events if event is not None]

    def _prefill(self, newcomers: list[_Sequence]) -> torch.Tensor:
        """Run the newcomers' prompts as one left-padded batch and merge their cache rows
        into the running batch. Returns their last-position logits."""
        from transformers import DynamicCache

        width = max(len(seq.prompt_ids) for seq in newcomers)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([[pad] * (width - len(s.prompt_ids)) + s.prompt_ids for s in newcomers])
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in newcomers])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                         position_ids=positions.to(self.model.device), use_cache=True, logits_to_keep=1,
                         **{self._cache_arg: cache})
        self._merge(cache, mask.to(self.model.device))
        self._running.extend(newcomers)
        self.stats.prefills += 1
        self.stats.prompt_tokens += int(mask.sum())
        return out.logits[:, -1, :]

    def _merge(self, cache, mask: torch.Tensor) -> None:
        """Append cache rows to the running batch, left-padding whichever side is shorter."""
        if self._cache is None:
            self._cache, self._mask = cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])

    def _decode(self) -> torch.Tensor:
        """Feed every running sequence its last token; returns next-token logits."""
        device = self.model.device
        last = torch.tensor([[seq.generated[-1]] for seq in self._running], device=device)
        positions = torch.tensor([[seq.position] for seq in self._running], device=device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._running), 1)], dim=1)
        out = self.model(input_ids=last, attention_mask=self._mask, position_ids=positions,
                         use_cache=True, **{self._cache_arg: self._cache})
        self.stats.decode_steps += 1
        return out.logits[:, -1, :]

    def _drop_rows(self, leaves: Callable[[_Sequence], bool]) -> None:
        """Remove the rows of sequences that leave, then the padding columns nobody needs."""
        keep = [i for i, seq in enumerate(self._running) if not leaves(seq)]
        if len(keep) == len(self._running):
            return
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._mask = self._mask[index]
        first_used = int(self._mask.any(dim=0).nonzero()[0])
        self._mask = self._mask[:, first_used:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, first_used:]
            layer.values = layer.values[index, :, first_used:]

    def _sample(self, logits: torch.Tensor, rows: list[_Sequence]) -> list[int]:
        logits = logits.double()  # float64: temperatures down to the smallest float divide cleanly
        tokens = []
        for row, seq in zip(logits, rows):
            if seq.params.temperature == 0:
                tokens.append(int(row.argmax()))
                continue
            # Shifted so the largest logit is 0: a tiny temperature then gives -inf, not inf - inf = NaN.
            scaled = (row - row.max()) / seq.params.temperature
            probs = _top_p(torch.softmax(scaled, dim=-1), seq.params.top_p)
            tokens.append(int(torch.multinomial(probs.cpu(), 1, generator=seq.generator)))
        return tokens

    def _advance(self, seq: _Sequence, token: int) -> TokenEvent | None:
        """Add a token to a sequence; return the event to send (None: nothing new to show)."""
        seq.generated.append(token)
        self.stats.generated_tokens += 1
        if token in self.eos_token_ids:
            seq.finish_reason = "stop"
            return self._event(seq, seq.emitted_text)
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        cut = _first_stop(text, seq.params.stop)
        if cut is not None:
            seq.finish_reason = "stop"
            return self._event(seq, text[:cut])
        if len(seq.generated) >= seq.params.max_tokens or seq.position + 1 >= self.context_length:
            seq.finish_reason = "length"
            return self._event(seq, text)
        shown = text[: len(text) - _held_back(text, seq.params.stop)]
        if len(shown) <= len(seq.emitted_text):
            return None
        return self._event(seq, shown)

    def _event(self, seq: _Sequence, text: str) -> TokenEvent:
        delta = text[len(seq.emitted_text):]
        seq.emitted_text = text
        if seq.finish_reason is not None:
            self.stats.finished[seq.finish_reason] = self.stats.finished.get(seq.finish_reason, 0) + 1
        return TokenEvent(delta, len(seq.generated), seq.finish_reason)


@dataclass
class EngineStats:
    """Counters and gauges one replica reports (see raymed.serve.metrics)."""

    waiting: int = 0
    running: int = 0
    prefills: int = 0
    decode_steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cancelled: int = 0
    step_seconds: float = 0.0
    finished: dict[str, int] = field(default_factory=dict)
    batch_size_buckets: list[int] = field(default_factory=lambda: [0] * len(BATCH_SIZE_BUCKETS))
    batch_size_sum: int = 0

    def observe_batch(self, size: int) -> None:
        """Count one decode step of `size` rows (a cumulative histogram, Prometheus style)."""
        for i, bound in enumerate(BATCH_SIZE_BUCKETS):
            if size <= bound:
                self.batch_size_buckets[i] += 1
        self.batch_size_sum += size

    def snapshot(self) -> dict:
        return {**self.__dict__, "finished": dict(self.finished), "batch_size_buckets": list(self.batch_size_buckets)}


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Pad dimension 1 (mask) or -2 (cache keys/values) on the left with zeros up to `width`."""
    dim = 1 if tensor.dim() == 2 else -2
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always the top one)."""
    if top_p >= 1:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
    sorted_probs[outside] = 0
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters to hold back: an incomplete UTF-8 character, or the
    start of a stop string that the next tokens may complete."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
