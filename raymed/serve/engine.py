"""Continuous batching on one replica: one decode loop over a batch of KV-cache slots.

Requests wait in a queue; between decode steps the loop prefills the newcomers (as one
left-padded batch), copies their keys and values into free slots of the running batch
(raymed.serve.slots, where a GPU's decode step is a replayed CUDA graph), and frees the
slots of finished or cancelled requests. So a request that arrives while a long batch
decodes gets its first token after one prefill, not after the batch ends. Each step's
next tokens come from raymed.serve.sampling's BatchSampler, whose rows follow the slots'.

The loop is one asyncio task per replica; each model step runs on a single worker thread,
so the event loop keeps accepting requests and streaming tokens while torch computes.
Every request reads its tokens from its own asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch

from raymed.serve.sampling import BatchSampler, SampledToken, SamplingParams, prompt_logprobs
from raymed.serve.slots import FIRST_COLUMNS, DecodeStep, SlotCache, cache_argument

__all__ = ["BatchingEngine", "EngineStats", "SamplingParams", "TokenEvent"]

logger = logging.getLogger("ray.serve")

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class TokenEvent:
    """What a request's stream yields: new text since the last event, the completion's
    token count so far, the finish reason on the last event (`stop` or `length`), and the
    new tokens' logprobs when the request asked for them: `{"token", "logprob", "top":
    [[token, logprob], ...]}` each, tokens as text."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None
    logprobs: tuple[dict, ...] = ()


@dataclass
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    decoded: str = ""  # the text of generated[:read_offset]
    text: str = ""  # the text of all generated tokens (held-back stop prefixes included)
    pending_logprobs: list[dict] = field(default_factory=list)  # not yet sent
    prefix_offset: int = 0  # where the decoding window starts (see BatchingEngine._text)
    read_offset: int = 0
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
                 eos_token_ids: set[int], on_step: Callable[[], None] | None = None, cuda_graphs: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.context_length = context_length
        self.eos_token_ids = eos_token_ids
        self.on_step = on_step
        self.stats = EngineStats()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # row i of the slots holds self._running[i]
        self._slots: SlotCache | None = None
        self._sampler: BatchSampler | None = None
        self._decode_step: DecodeStep | None = None
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda"
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raymed-decode")
        self._cache_arg = cache_argument(model)
        self._decode_ids = _text_decoder(tokenizer)
        self._token_texts: dict[int, str] = {}

    async def prompt_logprobs(self, prompt_ids: list[int], top: int) -> list[dict]:
        """The prompt's own token logprobs (see raymed.serve.sampling.prompt_logprobs), computed
        on the decode thread between steps."""
        loop = asyncio.get_running_loop()
        scored = await loop.run_in_executor(self._executor, self._score_prompt, list(prompt_ids), top)
        first = {"token": self._token_text(prompt_ids[0]), "logprob": None, "top": None}  # nothing precedes it
        return [first] + [self._logprob_entry(token) for token in scored[1:]]

    @torch.inference_mode()
    def _score_prompt(self, prompt_ids: list[int], top: int) -> list[SampledToken | None]:
        return prompt_logprobs(self.model, prompt_ids, top)

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
                event = _coalesce(await seq.queue.get(), seq.queue)
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
        self._running, self._slots, self._decode_step = [], None, None
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
        """Sample the next token of `rows` (the last rows of the batch) and advance each."""
        sampled = self._sampler.sample(logits, len(self._running) - len(rows), [seq.generator for seq in rows])
        events = ((seq, self._advance(seq, token)) for seq, token in zip(rows, sampled))
        return [(seq, event) for seq, event in events if event is not None]

    def _prefill(self, newcomers: list[_Sequence]) -> torch.Tensor:
        """Run the newcomers' prompts as one left-padded batch and copy their keys and values
        into the next free slots. Returns their last-position logits."""
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
        self._place([(layer.keys, layer.values) for layer in cache.layers], mask)
        if self._sampler is None:
            self._sampler = BatchSampler(self.max_batch_size, out.logits.shape[-1], out.logits.device)
        self._sampler.admit(len(self._running), [(seq.params, seq.prompt_ids) for seq in newcomers])
        self._running.extend(newcomers)
        self.stats.prefills += 1
        self.stats.prompt_tokens += int(mask.sum())
        return out.logits[:, -1, :]

    def _place(self, layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        if self._slots is None:
            self._slots = SlotCache(layers, rows=self.max_batch_size, columns=min(FIRST_COLUMNS, self.context_length + 1),
                                    max_columns=self.context_length + 1)
            self._decode_step = DecodeStep(self.model, self._cache_arg, self._slots, self.cuda_graphs)
        if self._slots.make_room(len(self._running), mask.shape[1]):
            self._decode_step.forget_graphs()
        self._slots.place(len(self._running), layers, mask)

    def _decode(self) -> torch.Tensor:
        """Feed every running sequence its last token; returns next-token logits."""
        if self._slots.make_room(len(self._running), 0):
            self._decode_step.forget_graphs()
        logits = self._decode_step.run([seq.generated[-1] for seq in self._running],
                                       [seq.position for seq in self._running])
        self._slots.end += 1
        self.stats.decode_steps += 1
        return logits

    def _drop_rows(self, leaves: Callable[[_Sequence], bool]) -> None:
        """Free the slots of sequences that leave: the last rows move into the holes, so the
        running rows stay the first ones. An idle CPU replica frees the slots' memory too."""
        leaving = [leaves(seq) for seq in self._running]
        if not any(leaving):
            return
        staying = leaving.count(False)
        holes = [i for i in range(staying) if leaving[i]]
        movers = [i for i in range(staying, len(self._running)) if not leaving[i]]
        self._slots.move_rows(movers, holes)
        self._sampler.move_rows(movers, holes)
        for source, target in zip(movers, holes):
            self._running[target] = self._running[source]
        del self._running[staying:]
        if not self._running and not self.cuda_graphs:
            self._slots, self._decode_step = None, None

    def _advance(self, seq: _Sequence, sampled: SampledToken) -> TokenEvent | None:
        """Add a token to a sequence; return the event to send (None: nothing new to show)."""
        token = sampled.token
        seq.generated.append(token)
        self.stats.generated_tokens += 1
        if seq.params.logprobs is not None:
            seq.pending_logprobs.append(self._logprob_entry(sampled))
        if token in self.eos_token_ids:  # the text so far, held-back stop prefixes included
            seq.finish_reason = "stop"
            return self._event(seq, seq.text)
        text = seq.text = self._text(seq)
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

    def _text(self, seq: _Sequence) -> str:
        """The text of all generated tokens, decoding only the last few (vLLM's incremental
        detokenizer): the window starts one emission back, so the tokens that merge across
        its edge (and an unfinished UTF-8 character) decode as in the whole text."""
        before = self._decode_ids(seq.generated[seq.prefix_offset: seq.read_offset])
        window = self._decode_ids(seq.generated[seq.prefix_offset:])
        if len(window) <= len(before) or window.endswith("\ufffd"):
            return seq.decoded + window[len(before):]
        seq.decoded += window[len(before):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.generated)
        return seq.decoded

    def _event(self, seq: _Sequence, text: str) -> TokenEvent:
        delta = text[len(seq.emitted_text):]
        seq.emitted_text = text
        if seq.finish_reason is not None:
            self.stats.finished[seq.finish_reason] = self.stats.finished.get(seq.finish_reason, 0) + 1
        logprobs, seq.pending_logprobs = tuple(seq.pending_logprobs), []
        return TokenEvent(delta, len(seq.generated), seq.finish_reason, logprobs)

    def _logprob_entry(self, sampled: SampledToken) -> dict:
        return {"token": self._token_text(sampled.token), "logprob": sampled.logprob,
                "top": [[self._token_text(token), logprob] for token, logprob in sampled.top]}

    def _token_text(self, token: int) -> str:
        """One token as text, special tokens included (what logprobs name)."""
        if token not in self._token_texts:
            self._token_texts[token] = self.tokenizer.decode([token])
        return self._token_texts[token]


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


def _text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, straight to the Rust tokenizer when
    the Python wrapper would add only its per-id type checks (most of the cost per token)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return partial(backend.decode, skip_special_tokens=True)
    return partial(tokenizer.decode, skip_special_tokens=True)


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _coalesce(event: TokenEvent | BaseException, queue: asyncio.Queue) -> TokenEvent:
    """One event for everything already waiting in a request's queue: a consumer that fell
    behind (a slow stream) gets one message per turn, not one per token."""
    while isinstance(event, TokenEvent) and event.finish_reason is None and not queue.empty():
        later = queue.get_nowait()
        if isinstance(later, BaseException):
            event = later
            break
        event = TokenEvent(event.text + later.text, later.completion_tokens, later.finish_reason,
                           event.logprobs + later.logprobs)
    if isinstance(event, BaseException):
        raise event
    return event


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
