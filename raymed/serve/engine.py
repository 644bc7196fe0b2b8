"""Continuous batching on one replica: one loop of steps over a batch of KV-cache slots.

Requests wait in a queue. Each step decodes one token for every running sequence and, in
the same step, prefills prompts within what is left of the step's token budget
(`serve.max_num_batched_tokens`; raymed.serve.prefill): short prompts whole, a long one in
chunks across steps (`serve.long_prefill_token_threshold`), so the running sequences keep
decoding meanwhile. A finished prefill's keys and values are copied into free slots of the
running batch (raymed.serve.slots, where a GPU's decode step is a replayed CUDA graph);
finished or cancelled requests free theirs.
A prefill that fails fails only its own requests. Every row's next token comes from one
call of raymed.serve.sampling's BatchSampler over the step's logits, read back once.

The loop is one asyncio task per replica; each step runs on a single worker thread, so the
event loop keeps accepting requests and streaming tokens while torch computes. Every
request reads its events (raymed.serve.sequences) from its own asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from raymed.config import ServeConfig
from raymed.serve.prefill import Prefiller, PrefillPlan, Prefilled
from raymed.serve.sampling import BatchSampler, SampledToken, SamplingParams, prompt_logprobs
from raymed.serve.sequences import Sequence, Texts, TokenEvent, coalesce, read_texts
from raymed.serve.slots import FIRST_COLUMNS, DecodeStep, SlotCache, cache_argument

__all__ = ["BatchingEngine", "EngineStats", "SamplingParams", "TokenEvent"]

logger = logging.getLogger("ray.serve")

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_MAX_NUM_BATCHED_TOKENS = ServeConfig.model_fields["max_num_batched_tokens"].default
CPU_LONG_PREFILL_TOKENS = 128
"""A CPU's default chunk: there a forward costs about the same per token at any length, so
a step with a 128-token chunk delays a chat turn of about 90 tokens (the default template's system
prompt included) about as long as its own prefill."""

Outcome = tuple[Sequence, TokenEvent | Exception]


class BatchingEngine:
    """Generates for many requests at once on one model; see the module docstring."""

    def __init__(self, model, tokenizer, *, max_batch_size: int, context_length: int, eos_token_ids: set[int],
                 max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
                 long_prefill_token_threshold: int | None = None,
                 on_step: Callable[[], None] | None = None, cuda_graphs: bool = False):
        if max_num_batched_tokens <= max_batch_size:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be more than "
                             f"max_batch_size ({max_batch_size}): a full batch's decode step leaves room to prefill")
        self.model = model
        self.max_batch_size = max_batch_size
        self.context_length = context_length
        self.eos_token_ids = eos_token_ids
        self.on_step = on_step
        self.stats = EngineStats()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # row i of the slots holds self._running[i]
        self._slots: SlotCache | None = None
        self._sampler: BatchSampler | None = None
        self._decode_step: DecodeStep | None = None
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda"
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raymed-decode")
        self._cache_arg = cache_argument(model)
        if long_prefill_token_threshold is None:  # a GPU's forward costs about the same up to the budget
            long_prefill_token_threshold = (max_num_batched_tokens if model.device.type == "cuda"
                                            else CPU_LONG_PREFILL_TOKENS)
        self._prefiller = Prefiller(model, self._cache_arg, tokenizer.pad_token_id or 0, max_batch_size,
                                    max_num_batched_tokens, long_prefill_token_threshold)
        self._texts = Texts(tokenizer)

    async def prompt_logprobs(self, prompt_ids: list[int], top: int) -> list[dict]:
        """The prompt's own token logprobs (see raymed.serve.sampling.prompt_logprobs), computed
        on the decode thread between steps."""
        loop = asyncio.get_running_loop()
        scored = await loop.run_in_executor(self._executor, self._score_prompt, list(prompt_ids), top)
        first = {"token": self._texts.token(prompt_ids[0]), "logprob": None, "top": None}  # nothing precedes it
        return [first] + [self._texts.logprob_entry(token) for token in scored[1:]]

    @torch.inference_mode()
    def _score_prompt(self, prompt_ids: list[int], top: int) -> list[SampledToken | None]:
        return prompt_logprobs(self.model, prompt_ids, top)

    # ---- the request side (event loop) ----

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Stream one request's tokens. Closing the iterator early (a client that went away)
        cancels the request: its row leaves the batch at the next step."""
        if not prompt_ids:  # refused here, before it could fail the whole batch's step
            raise ValueError(f"request {request_id} has an empty prompt")
        seq = Sequence(request_id, list(prompt_ids), params)
        self._waiting.append(seq)
        self.stats.waiting = len(self._waiting)
        self._ensure_loop()
        self._wake.set()
        try:
            while True:
                event = coalesce(await seq.queue.get(), seq.queue)
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
            if not self._waiting and not self._running and self._prefiller.chunking is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            plan = self._prefiller.plan(self._waiting, len(self._running))
            self.stats.waiting = len(self._waiting)
            try:
                outcomes = await loop.run_in_executor(self._executor, self._step, plan)
            except Exception as err:  # a decode failure fails the requests in flight, not the replica
                logger.exception("decode step failed")
                outcomes = self._fail_all(err, plan)
            for seq, event in outcomes:
                seq.queue.put_nowait(event)
            if self.on_step is not None:
                self.on_step()

    def _fail_all(self, err: Exception, plan: PrefillPlan) -> list[Outcome]:
        chunking = self._prefiller.forget_chunk()
        failed = list(dict.fromkeys([*self._running, *plan.whole, *([chunking] if chunking is not None else [])]))
        self._running, self._slots, self._decode_step = [], None, None
        self.stats.running = 0
        return _failures(failed, err)

    # ---- the model side (the decode thread) ----

    @torch.inference_mode()
    def _step(self, plan: PrefillPlan) -> list[Outcome]:
        """One step: a decode step for the running batch, then the planned prefills, then one
        sampling call for every row that has a next token. Returns the events to deliver."""
        started = time.perf_counter()
        self._drop_rows(lambda seq: seq.cancelled)
        logits, failed = [], []
        if self._running:
            self.stats.observe_batch(len(self._running))
            logits.append(self._decode())
        if plan.whole:
            failed += self._join(plan.whole, lambda: self._prefiller.whole(plan.whole), logits)
        chunking = self._prefiller.chunking
        if chunking is not None and chunking.cancelled:
            self._prefiller.forget_chunk()
        elif plan.chunk_tokens:
            failed += self._join([chunking], lambda: self._prefiller.next_chunk(plan.chunk_tokens), logits)
        outcomes = self._advance_all(logits[0] if len(logits) == 1 else torch.cat(logits)) if logits else []
        self._drop_rows(lambda seq: seq.finish_reason is not None)
        self.stats.running = len(self._running)
        self.stats.step_seconds += time.perf_counter() - started
        return outcomes + failed

    def _join(self, seqs: list[Sequence], prefill: Callable[[], Prefilled | None],
              logits: list[torch.Tensor]) -> list[Outcome]:
        """Run a prefill; once done, its rows join the batch (their logits appended). A
        failure fails `seqs` alone: returned as their outcomes."""
        try:
            done = prefill()
            if done is None:  # a chunk of a prompt that is not finished yet
                return []
            layers, mask, last_logits = done
            self._place(layers, mask)
        except Exception as err:
            if seqs[0] is self._prefiller.chunking:
                self._prefiller.forget_chunk()
            elif len(seqs) > 1:  # find the request that fails: each of the batch alone
                logger.warning("prefill of %d requests failed; prefilling each alone", len(seqs), exc_info=True)
                return [failure for seq in seqs
                        for failure in self._join([seq], lambda seq=seq: self._prefiller.whole([seq]), logits)]
            logger.exception("prefill of request %s failed", seqs[0].request_id)
            return _failures(seqs, err)
        if self._sampler is None:
            self._sampler = BatchSampler(self.max_batch_size, last_logits.shape[-1], last_logits.device)
        self._sampler.admit(len(self._running), [(seq.params, seq.prompt_ids) for seq in seqs])
        self._running.extend(seqs)
        logits.append(last_logits)
        self.stats.prefills += 1
        self.stats.prompt_tokens += int(mask.sum())
        return []

    def _advance_all(self, logits: torch.Tensor) -> list[Outcome]:
        """Sample every row's next token (one read-back), then advance the rows together."""
        sampled = self._sampler.sample(logits)
        self.stats.generated_tokens += len(sampled)
        rows, texts, eos = self._running, self._texts, self.eos_token_ids
        ended = [seq.add(token, texts, eos) for seq, token in zip(rows, sampled)]
        read_texts([seq for seq, end in zip(rows, ended) if not end], texts)
        outcomes, finished = [], self.stats.finished
        for seq, end in zip(rows, ended):
            event = seq.next_event(end, self.context_length)
            if event is None:
                continue
            outcomes.append((seq, event))
            if event.finish_reason is not None:
                finished[event.finish_reason] = finished.get(event.finish_reason, 0) + 1
        return outcomes

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

    def _drop_rows(self, leaves: Callable[[Sequence], bool]) -> None:
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


def _failures(seqs: list[Sequence], err: Exception) -> list[Outcome]:
    for seq in seqs:
        seq.finish_reason = "error"
    return [(seq, err) for seq in seqs]


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
