"""The continuous-batching engine alone (no Ray): its answers equal plain `generate`, a
newcomer joins a running batch, a cancelled request leaves it, sampling is seeded."""

from __future__ import annotations

import asyncio

import pytest
import torch
from serve_support import TINY_ARCHITECTURE

from raymed.serve.engine import BatchingEngine, SamplingParams

pytestmark = pytest.mark.slow  # 15-35 s on 2 cores: model forwards plus plain `generate` references


@pytest.fixture(scope="module")
def model_and_tokenizer(default_assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(default_assets / "models" / "smollm2-135m-instruct")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, **TINY_ARCHITECTURE)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def make_engine(model_and_tokenizer, max_batch_size=3, eos=frozenset()):
    model, tokenizer = model_and_tokenizer
    return BatchingEngine(model, tokenizer, max_batch_size=max_batch_size, context_length=2048,
                          eos_token_ids=set(eos))


def reference(model_and_tokenizer, prompt_ids, max_tokens):
    model, tokenizer = model_and_tokenizer
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


async def collect(engine, request_id, prompt_ids, params, after: asyncio.Event | None = None):
    if after is not None:
        await after.wait()
    text, last = "", None
    async for event in engine.generate(request_id, prompt_ids, params):
        text, last = text + event.text, event
    return text, last


PROMPTS = ["What is a fever?", "x", "The patient presented with a long list of symptoms including",
           "Hello there, how are you today?"]


def test_batched_greedy_answers_equal_one_at_a_time_generate(model_and_tokenizer):
    """Four requests of different lengths through a batch of 3: joins, merges, drops."""
    tokenizer = model_and_tokenizer[1]
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    lengths = [30, 12, 25, 40]

    async def main():
        engine = make_engine(model_and_tokenizer)
        results = await asyncio.gather(*(
            collect(engine, str(i), ids, SamplingParams(max_tokens=n, temperature=0))
            for i, (ids, n) in enumerate(zip(prompts, lengths))))
        return engine, results

    engine, results = asyncio.run(main())
    for ids, n, (text, last) in zip(prompts, lengths, results):
        assert text == reference(model_and_tokenizer, ids, n)
        assert (last.completion_tokens, last.finish_reason) == (n, "length")
    assert engine.stats.prefills >= 2  # the fourth joined after one of the first three left
    assert engine.stats.running == 0 and engine.stats.finished == {"length": 4}


def test_a_newcomer_joins_between_decode_steps_and_a_cancelled_request_leaves(model_and_tokenizer):
    tokenizer = model_and_tokenizer[1]
    long_ids, short_ids = tokenizer(PROMPTS[2])["input_ids"], tokenizer(PROMPTS[0])["input_ids"]

    async def main():
        engine = make_engine(model_and_tokenizer)
        long_stream = engine.generate("long", long_ids, SamplingParams(max_tokens=1500, temperature=0))
        for _ in range(5):  # the long request is decoding
            await anext(long_stream)
        short_text, short_last = await collect(engine, "short", short_ids, SamplingParams(max_tokens=4, temperature=0))
        long_tokens_then = engine._running[0].generated.__len__()
        await long_stream.aclose()  # the client went away
        while engine.stats.running:
            await asyncio.sleep(0.01)
        return engine, short_text, short_last, long_tokens_then

    engine, short_text, short_last, long_tokens_then = asyncio.run(main())
    assert short_text == reference(model_and_tokenizer, short_ids, 4)
    assert long_tokens_then < 1500  # the short one finished while the long one was still decoding
    assert engine.stats.cancelled == 1 and engine.stats.finished == {"length": 1}
    assert engine.stats.batch_size_buckets[0] < engine.stats.batch_size_buckets[1]  # steps with 2 rows
    assert engine._slots is None  # the batch is empty, nothing held


def test_seeded_sampling_repeats_and_stop_strings_cut(model_and_tokenizer):
    ids = model_and_tokenizer[1](PROMPTS[3])["input_ids"]

    async def run(params):
        return (await collect(make_engine(model_and_tokenizer), "r", ids, params))

    first, _ = asyncio.run(run(SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=3)))
    again, _ = asyncio.run(run(SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=3)))
    assert first == again
    greedy, _ = asyncio.run(run(SamplingParams(max_tokens=15, temperature=0)))
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 2]
    cut, last = asyncio.run(run(SamplingParams(max_tokens=15, temperature=0, stop=(stop,))))
    assert cut == greedy[:greedy.index(stop)] and last.finish_reason == "stop"


def test_an_end_of_sequence_token_stops_the_answer(model_and_tokenizer):
    ids = model_and_tokenizer[1](PROMPTS[0])["input_ids"]
    greedy_ids = model_and_tokenizer[0].generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                                 pad_token_id=0)[0, len(ids):].tolist()
    eos = greedy_ids[3]  # pretend the fourth greedy token ends the sequence

    async def main():
        return await collect(make_engine(model_and_tokenizer, eos={eos}), "r", ids,
                             SamplingParams(max_tokens=6, temperature=0))

    text, last = asyncio.run(main())
    assert last.finish_reason == "stop" and last.completion_tokens == greedy_ids.index(eos) + 1
    assert text == model_and_tokenizer[1].decode(greedy_ids[:greedy_ids.index(eos)], skip_special_tokens=True)
