"""Inputs the API fuzzer found that once failed a replica's whole batch (no Ray): one
request's bad input must not fail the requests decoded beside it."""

from __future__ import annotations

import asyncio

import pytest
import torch
from serve_support import TINY_ARCHITECTURE

from raymed.serve.engine import BatchingEngine, SamplingParams


@pytest.fixture(scope="module")
def engine_parts(smollm2_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=49152, **TINY_ARCHITECTURE)).eval(), smollm2_tokenizer


async def answer(engine, request_id, prompt_ids, params) -> tuple[str, str]:
    text, finish = "", None
    async for event in engine.generate(request_id, prompt_ids, params):
        text, finish = text + event.text, event.finish_reason
    return text, finish


def run_together(engine_parts, *requests_):
    """Answers for (prompt_ids, params) pairs decoded in one batch; exceptions returned."""
    model, tokenizer = engine_parts

    async def main():
        engine = BatchingEngine(model, tokenizer, max_batch_size=4, context_length=2048, eos_token_ids=set())
        return await asyncio.gather(*(answer(engine, f"r{i}", ids, params) for i, (ids, params)
                                      in enumerate(requests_)), return_exceptions=True)

    return asyncio.run(main())


@pytest.mark.slow
def test_the_smallest_temperature_samples_the_greedy_answer_beside_others(engine_parts):
    ids = engine_parts[1]("What is a fever?")["input_ids"]
    greedy, tiny, ordinary = run_together(engine_parts, (ids, SamplingParams(max_tokens=6, temperature=0)),
                                          (ids, SamplingParams(max_tokens=6, temperature=5e-324)),
                                          (ids, SamplingParams(max_tokens=6, temperature=1.0, seed=1)))
    assert tiny == greedy and greedy[1] == "length"
    assert ordinary[1] == "length"


@pytest.mark.slow
def test_an_empty_prompt_is_refused_without_touching_the_batch(engine_parts):
    ids = engine_parts[1]("What is a fever?")["input_ids"]
    empty, fine = run_together(engine_parts, ([], SamplingParams(max_tokens=4, temperature=0)),
                               (ids, SamplingParams(max_tokens=4, temperature=0)))
    assert isinstance(empty, ValueError) and "empty prompt" in str(empty)
    assert fine[1] == "length"
