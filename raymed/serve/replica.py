"""A model replica (`ModelServer`): loads the model once and runs the batching engine
(raymed.serve.engine) for the Gateway's work orders."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from ray import serve

from raymed.config import Config
from raymed.serve import safety
from raymed.serve.engine import BatchingEngine, SamplingParams
from raymed.serve.model_source import context_length, eos_token_ids, load_for_inference

logger = logging.getLogger("ray.serve")

REPORT_EVERY_S = 0.5
"""How often a busy replica pushes its figures to the MetricsStore (idle: every 5 s)."""
IDLE_REPORT_EVERY_S = 5.0


class ModelServer:
    """One model replica: loads the model once and runs the batching engine.

    A work order (`job`) is `{"request_id", "prompt_ids", "sampling": SamplingParams fields,
    "echo": bool}`; with `echo` and logprobs the first event carries the prompt's own token
    logprobs (`prompt_logprobs`), and `max_tokens: 0` then generates nothing.

    `admission_gate` is a test hook: an actor whose `wait()` each request awaits before it
    is admitted, so a test can hold a replica busy deterministically (no sleeps)."""

    async def __init__(self, config_data: dict, model_dir: str, metrics_store=None, admission_gate=None):
        import torch

        safety.install_log_redaction()
        serve_config = Config.model_validate(config_data).serve
        torch.set_num_threads(max(1, int(serve_config.num_cpus)))
        model, tokenizer = await asyncio.to_thread(load_for_inference, model_dir, serve_config)
        self.engine = BatchingEngine(
            model, tokenizer, max_batch_size=serve_config.max_batch_size,
            max_num_batched_tokens=serve_config.max_num_batched_tokens,
            long_prefill_token_threshold=serve_config.long_prefill_token_threshold,
            context_length=context_length(Path(model_dir)),
            eos_token_ids=eos_token_ids(model, tokenizer), on_step=self._mark_changed,
            cuda_graphs=serve_config.cuda_graphs,
        )
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._gate = admission_gate
        self._store = metrics_store
        self._changed = asyncio.Event()
        self._reporter = asyncio.create_task(self._report_forever()) if metrics_store else None

    async def generate_stream(self, job: dict) -> AsyncIterator[dict]:
        """Events for one request: `{"text", "completion_tokens", "finish_reason", "logprobs"}`
        (and `prompt_logprobs` on the first, for an echo)."""
        if self._gate is not None:
            await self._gate.wait.remote()
        started = time.perf_counter()
        first_token_s = None
        params = SamplingParams(**job["sampling"])
        logger.info("request %s admitted: prompt_tokens=%d max_tokens=%d", job["request_id"],
                    len(job["prompt_ids"]), params.max_tokens)
        echoed = None
        if job.get("echo") and params.logprobs is not None:
            echoed = await self.engine.prompt_logprobs(job["prompt_ids"], params.logprobs)
        event = {"text": "", "completion_tokens": 0, "finish_reason": "length", "logprobs": []}
        if params.max_tokens == 0:
            yield {**event, "prompt_logprobs": echoed}
            return
        async for token_event in self.engine.generate(job["request_id"], job["prompt_ids"], params):
            if first_token_s is None:
                first_token_s = time.perf_counter() - started
            event = {"text": token_event.text, "completion_tokens": token_event.completion_tokens,
                     "finish_reason": token_event.finish_reason, "logprobs": list(token_event.logprobs)}
            if echoed is not None:
                event["prompt_logprobs"], echoed = echoed, None
            yield event
        logger.info("request %s finished: completion_tokens=%d finish=%s ttft_s=%.3f total_s=%.3f",
                    job["request_id"], event["completion_tokens"], event["finish_reason"], first_token_s,
                    time.perf_counter() - started)

    async def generate(self, job: dict) -> dict:
        """The whole answer at once, in one event of the same shape."""
        text, logprobs, prompt_logprobs = [], [], None
        async for event in self.generate_stream(job):
            text.append(event["text"])
            logprobs.extend(event["logprobs"])
            prompt_logprobs = event.get("prompt_logprobs", prompt_logprobs)
        return {**event, "text": "".join(text), "logprobs": logprobs, "prompt_logprobs": prompt_logprobs}

    def _mark_changed(self) -> None:
        self._changed.set()

    async def _report_forever(self) -> None:
        """Push this replica's figures to the MetricsStore (often while busy, rarely idle)."""
        while True:
            try:
                await self._store.report.remote(self.replica, self.engine.stats.snapshot())
            except Exception:  # the store restarting must not take the replica down
                logger.warning("could not report metrics", exc_info=True)
            try:
                await asyncio.wait_for(self._changed.wait(), IDLE_REPORT_EVERY_S)
            except TimeoutError:
                pass
            self._changed.clear()
            await asyncio.sleep(REPORT_EVERY_S)
