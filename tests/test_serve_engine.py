"""The continuous-batching engine alone (no Ray): its answers equal plain `generate`, a
newcomer joins a running batch, a cancelled request leaves it, sampling is seeded."""

from __future__ import annotations

import asyncio

import pytest
import torch
from serve_support import tiny_engine_model

from raymed.serve.engine import BatchingEngine, SamplingParams

pytestmark = pytest.mark.slow  # 15-35 s on 2 cores: model forwards plus plain `generate` references


@pytest.fixture(scope="module")
def model_and_tokenizer(default_assets):
    return tiny_engine_model(default_assets)


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


def _greedy_ids(model_and_tokenizer, ids, count):
    return model_and_tokenizer[0].generate(torch.tensor([ids]), max_new_tokens=count, do_sample=False,
                                           pad_token_id=0)[0, len(ids):].tolist()


def test_text_held_back_as_a_possible_stop_is_sent_when_the_sequence_ends(model_and_tokenizer):
    """A stop string's first character at the end of the answer is held back; the end of
    sequence arriving next must send it (it used to be lost)."""
    tokenizer = model_and_tokenizer[1]
    ids = tokenizer(PROMPTS[0])["input_ids"]
    greedy_ids = _greedy_ids(model_and_tokenizer, ids, 6)
    eos = greedy_ids[3]
    before = tokenizer.decode(greedy_ids[:greedy_ids.index(eos)], skip_special_tokens=True)
    stop = before[-1] + "\x07never"

    async def main():
        return await collect(make_engine(model_and_tokenizer, eos={eos}), "r", ids,
                             SamplingParams(max_tokens=6, temperature=0, stop=(stop,)))

    text, last = asyncio.run(main())
    assert last.finish_reason == "stop"
    assert text == before


def _run_together(model_and_tokenizer, ids, params_list):
    async def main():
        engine = make_engine(model_and_tokenizer, max_batch_size=len(params_list))
        return await asyncio.gather(*(collect(engine, str(i), ids, p) for i, p in enumerate(params_list)))

    return asyncio.run(main())


def test_logit_bias_applies_to_its_own_row_only(model_and_tokenizer):
    tokenizer = model_and_tokenizer[1]
    ids = tokenizer(PROMPTS[3])["input_ids"]
    forced = tokenizer(" fever", add_special_tokens=False)["input_ids"][0]
    (biased, _), (plain, _) = _run_together(model_and_tokenizer, ids, [
        SamplingParams(max_tokens=5, temperature=0, logit_bias=((forced, 100.0),)),
        SamplingParams(max_tokens=5, temperature=0)])
    assert biased == tokenizer.decode([forced] * 5)
    assert plain == reference(model_and_tokenizer, ids, 5)


def test_each_penalty_stops_the_repeats_a_logit_bias_causes(model_and_tokenizer):
    """+2 on one token makes the random model say it every time (its logits span about
    +-0.7); each penalty, in its own row of one batch, must break that."""
    tokenizer = model_and_tokenizer[1]
    ids = tokenizer(PROMPTS[1])["input_ids"]
    favourite = tokenizer(" fever", add_special_tokens=False)["input_ids"][0]
    bias = ((favourite, 2.0),)
    results = _run_together_logprobs(model_and_tokenizer, ids, [
        SamplingParams(max_tokens=24, temperature=0, logit_bias=bias, logprobs=0),
        SamplingParams(max_tokens=24, temperature=0, logit_bias=bias, logprobs=0, frequency_penalty=1.0),
        SamplingParams(max_tokens=24, temperature=0, logit_bias=bias, logprobs=0, presence_penalty=2.0),
        SamplingParams(max_tokens=24, temperature=0, logit_bias=bias, logprobs=0, repetition_penalty=5.0)])
    said = [[entry["token"] for entry in last_logprobs(result)].count(" fever") for result in results]
    assert said[0] == 24
    assert all(1 <= count <= 4 for count in said[1:]), said


def last_logprobs(result):
    """All logprob entries of a stream that collect_logprobs read."""
    return result[2]


def _run_together_logprobs(model_and_tokenizer, ids, params_list):
    async def main():
        engine = make_engine(model_and_tokenizer, max_batch_size=len(params_list))
        return await asyncio.gather(*(collect_logprobs(engine, str(i), ids, p) for i, p in enumerate(params_list)))

    return asyncio.run(main())


async def collect_logprobs(engine, request_id, prompt_ids, params):
    text, entries, last = "", [], None
    async for event in engine.generate(request_id, prompt_ids, params):
        text, last = text + event.text, event
        entries.extend(event.logprobs)
    return text, last, entries


def test_logprobs_are_the_models_own_in_the_answer_and_in_the_prompt(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(PROMPTS[2])["input_ids"]

    async def main():
        engine = make_engine(model_and_tokenizer)
        answer = await collect_logprobs(engine, "a", ids, SamplingParams(max_tokens=8, temperature=0, logprobs=3))
        return answer, await engine.prompt_logprobs(ids, 2)

    (text, last, entries), prompt_entries = asyncio.run(main())
    generated = _greedy_ids(model_and_tokenizer, ids, 8)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids + generated])).logits[0].float(), dim=-1)
    assert len(entries) == 8
    for i, (token, entry) in enumerate(zip(generated, entries)):
        row = logprobs[len(ids) - 1 + i]
        assert entry["token"] == tokenizer.decode([token])
        assert entry["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
        assert [t for t, _ in entry["top"]] == [tokenizer.decode([t]) for t in row.topk(3).indices.tolist()]
    assert prompt_entries[0] == {"token": tokenizer.decode(ids[:1]), "logprob": None, "top": None}
    assert len(prompt_entries) == len(ids)
    for i, entry in enumerate(prompt_entries[1:], start=1):
        assert entry["logprob"] == pytest.approx(float(logprobs[i - 1, ids[i]]), abs=1e-4)
        assert len(entry["top"]) == 2
