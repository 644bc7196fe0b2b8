"""Prefill under the step's token budget (raymed.serve.prefill), through the engine with a
tiny real model: a prompt prefilled in chunks answers as in one piece while the running
sequences keep decoding; mixed prompt lengths answer as one-at-a-time `generate`; a prefill
that raises fails only its own requests; a seeded request samples the same tokens whatever
else is in the batch."""

from __future__ import annotations

import asyncio
from collections import deque
from functools import wraps

import pytest
import torch
from serve_support import tiny_engine_model

from raymed.serve.engine import BatchingEngine, SamplingParams
from raymed.serve.prefill import Prefiller, PrefillPlan
from raymed.serve.sequences import Sequence

pytestmark = pytest.mark.slow  # ~20 s on 2 cores: tiny-model steps plus `generate` references

LONG = ("The patient, a 54-year-old man with a history of hypertension and type 2 diabetes, presented "
        "with three days of fever, productive cough, pleuritic chest pain and shortness of breath")


@pytest.fixture(scope="module")
def model_and_tokenizer(default_assets):
    return tiny_engine_model(default_assets)


def make_engine(model_and_tokenizer, budget, max_batch_size=4, threshold=None):
    model, tokenizer = model_and_tokenizer
    return BatchingEngine(model, tokenizer, max_batch_size=max_batch_size, context_length=2048,
                          eos_token_ids=set(), max_num_batched_tokens=budget, long_prefill_token_threshold=threshold)


def reference(model_and_tokenizer, prompt_ids, max_tokens):
    model, tokenizer = model_and_tokenizer
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


async def collect(engine, request_id, prompt_ids, params):
    text, last = "", None
    async for event in engine.generate(request_id, prompt_ids, params):
        text, last = text + event.text, event
    return text, last


def greedy(max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0)


def count_chunks(monkeypatch) -> list[int]:
    """Record the size of every chunk the Prefiller runs."""
    sizes = []
    original = Prefiller.next_chunk

    def next_chunk(self, tokens):
        sizes.append(tokens)
        return original(self, tokens)

    monkeypatch.setattr(Prefiller, "next_chunk", next_chunk)
    return sizes


def test_a_prompt_prefilled_in_chunks_answers_as_in_one_piece_while_others_decode(model_and_tokenizer, monkeypatch):
    tokenizer = model_and_tokenizer[1]
    long_ids, short_ids = tokenizer(LONG)["input_ids"], tokenizer("What is a fever?")["input_ids"]
    assert len(long_ids) > 3 * 12
    chunks = count_chunks(monkeypatch)

    async def main(budget, threshold=None):
        engine = make_engine(model_and_tokenizer, budget, threshold=threshold)
        short = engine.generate("short", short_ids, greedy(60))
        first = short_tokens = (await anext(short)).completion_tokens
        long_task = asyncio.create_task(collect(engine, "long", long_ids, greedy(8)))
        async for event in short:  # the short one keeps decoding while the long one prefills
            short_tokens = event.completion_tokens
            if engine._prefiller.chunking is None and engine.stats.prefills == 2:
                break
        await short.aclose()
        return await long_task, short_tokens - first

    (one_piece, _), _ = asyncio.run(main(budget=512))
    assert chunks == []
    (chunked, last), short_gained = asyncio.run(main(budget=12))
    assert chunked == one_piece == reference(model_and_tokenizer, long_ids, 8)
    assert last.finish_reason == "length"
    assert len(chunks) >= 3 and sum(chunks) == len(long_ids) and max(chunks) <= 12 - 1
    assert short_gained >= len(chunks) - 1  # the short request decoded in every step of the long prefill
    chunks.clear()
    (by_threshold, _), _ = asyncio.run(main(budget=512, threshold=8))  # the budget has room; the threshold cuts
    assert by_threshold == one_piece
    assert sum(chunks) == len(long_ids) and max(chunks) == 8


def test_short_prompts_go_before_the_next_chunk_of_a_long_one_but_cannot_starve_it():
    """Planning alone (no model): a long prompt is cut at the threshold; a step with short
    newcomers skips the chunk, but never two steps running."""
    prefiller = Prefiller(None, "cache", 0, max_rows=8, max_tokens=512, chunk_tokens=64)
    waiting = deque([Sequence("long", list(range(1, 301)), greedy(4))])
    assert prefiller.plan(waiting, running=0) == PrefillPlan([], 64)
    prefiller._chunk_done = 64
    shorts = [Sequence(f"short{i}", [1, 2, 3], greedy(4)) for i in range(3)]
    plans = []
    for short in shorts:  # a short newcomer before every step
        waiting.append(short)
        plans.append(prefiller.plan(waiting, running=1 + len(plans)))
    assert [(len(plan.whole), plan.chunk_tokens) for plan in plans] == [(1, 0), (1, 64), (1, 0)]
    assert prefiller.chunking.request_id == "long"


def test_mixed_prompt_lengths_answer_as_one_at_a_time_generate(model_and_tokenizer):
    """Seven prompts of 1 to ~40 tokens through 3 rows and a 16-token budget: whole prompts,
    chunked ones, and newcomers joining a batch that is decoding."""
    tokenizer = model_and_tokenizer[1]
    texts = ["x", "What is a fever?", LONG, "Hello there, how are you today?", LONG[:90], "Cough", LONG[40:]]
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    lengths = [9, 14, 6, 11, 7, 12, 5]

    async def main():
        engine = make_engine(model_and_tokenizer, budget=16, max_batch_size=3)
        return engine, await asyncio.gather(*(collect(engine, str(i), ids, greedy(n))
                                              for i, (ids, n) in enumerate(zip(prompts, lengths))))

    engine, results = asyncio.run(main())
    for ids, n, (text, last) in zip(prompts, lengths, results):
        assert text == reference(model_and_tokenizer, ids, n)
        assert last.completion_tokens == n
    assert engine.stats.finished == {"length": 7} and engine.stats.running == 0


def poison_forward(model, poison: int):
    """Make the model raise on any prefill whose tokens include `poison` (as an out-of-memory
    error would on a prompt too large); returns the restore function."""
    original = model.forward

    @wraps(original)
    def forward(*args, **kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1 and bool((ids == poison).any()):
            raise RuntimeError("prefill ran out of memory")
        return original(*args, **kwargs)

    model.forward = forward
    return lambda: setattr(model, "forward", original)


@pytest.mark.parametrize("budget", [512, 12], ids=["whole", "chunked"])
def test_a_prefill_that_raises_fails_only_its_own_request(model_and_tokenizer, budget):
    """Whole: the bad prompt shares its prefill batch with a good one (retried alone);
    chunked: it fails in a late chunk. The running request and the good one finish."""
    model, tokenizer = model_and_tokenizer
    good_ids, other_ids = tokenizer("What is a fever?")["input_ids"], tokenizer("Cough")["input_ids"]
    bad_ids = tokenizer(LONG)["input_ids"]
    poison = bad_ids[-3]  # reached only in a late chunk when chunked
    assert poison not in good_ids + other_ids
    restore = poison_forward(model, poison)

    async def main():
        engine = make_engine(model_and_tokenizer, budget)
        running = engine.generate("running", good_ids, greedy(20))
        first = await anext(running)  # decoding when the bad prompt arrives
        rest = asyncio.create_task(_drain(running, first))
        bad = asyncio.create_task(collect(engine, "bad", bad_ids, greedy(5)))
        other = asyncio.create_task(collect(engine, "other", other_ids, greedy(6)))
        results = await asyncio.gather(rest, bad, other, return_exceptions=True)
        return engine, results

    try:
        engine, (running_text, bad, (other_text, _)) = asyncio.run(main())
    finally:
        restore()
    assert isinstance(bad, RuntimeError) and "out of memory" in str(bad)
    assert running_text == reference(model_and_tokenizer, good_ids, 20)
    assert other_text == reference(model_and_tokenizer, other_ids, 6)
    assert engine.stats.finished == {"length": 2} and engine._prefiller.chunking is None


async def _drain(stream, first):
    text = first.text
    async for event in stream:
        text += event.text
    return text


def test_a_seeded_request_samples_the_same_tokens_whatever_else_is_in_the_batch(model_and_tokenizer):
    tokenizer = model_and_tokenizer[1]
    ids = tokenizer("Hello there, how are you today?")["input_ids"]
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=11)

    async def alone():
        return await collect(make_engine(model_and_tokenizer, budget=64), "seeded", ids, seeded)

    async def in_company():
        engine = make_engine(model_and_tokenizer, budget=16)
        companions = [collect(engine, "greedy", tokenizer(LONG)["input_ids"], greedy(10)),
                      collect(engine, "sampled", tokenizer("Cough")["input_ids"],
                              SamplingParams(max_tokens=20, temperature=0.7, frequency_penalty=0.5, seed=3)),
                      collect(engine, "unseeded", ids, SamplingParams(max_tokens=12, temperature=1.0))]
        results = await asyncio.gather(*companions, collect(engine, "seeded", ids, seeded))
        return results[-1]

    (text, _), (again, _) = asyncio.run(alone()), asyncio.run(in_company())
    assert text == again
    assert text != reference(model_and_tokenizer, ids, 16)  # it did sample
