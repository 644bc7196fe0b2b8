"""The engine's KV-cache slots (raymed.serve.slots) under the moves that continuous batching
forces: a newcomer wider than the used columns (they move right), a long answer that runs
past the first allocation (the tensors grow), rows that leave holes (the last rows move in),
dead columns on the left (the used ones move left). Every answer must still equal plain
one-at-a-time `generate`, for a Llama and a GPT-2 architecture.

The GPU path replays one CUDA graph per batch-size bucket over all columns. CI has no GPU,
so `FullWidthSteps` runs that same step (bucket rows, every column, idle rows attending to
the write column) eagerly in place of the replay; the capture itself is checked on a GPU
by bench/decode_step.py (graph against eager logits, in bench/gpu_suite.sh)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from serve_support import TINY_ARCHITECTURE

from raymed.serve.engine import BatchingEngine, SamplingParams
from raymed.serve.slots import DecodeStep, SlotCache, _bucket

pytestmark = pytest.mark.slow  # ~20 s on 2 cores: a few hundred tiny-model steps plus references


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_and_tokenizer(request, default_assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(default_assets / "models" / "smollm2-135m-instruct")
    torch.manual_seed(0)
    if request.param == "llama":
        config = LlamaConfig(vocab_size=49152, **TINY_ARCHITECTURE)
    else:
        config = GPT2Config(vocab_size=49152, n_layer=2, n_head=4, n_embd=64, n_positions=1024)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return model, tokenizer


class FullWidthSteps(DecodeStep):
    """The graph path's step, run eagerly instead of captured (see the module docstring)."""

    def _capture(self, rows):
        step = self

        class Replay:
            def replay(self):
                logits.copy_(step._forward(rows, step.slots.columns))

        logits = self._forward(rows, self.slots.columns).clone()
        return Replay(), logits


def reference(model_and_tokenizer, prompt_ids, max_tokens):
    model, tokenizer = model_and_tokenizer
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


@pytest.mark.parametrize("full_width", [False, True], ids=["eager", "full-width-buckets"])
def test_answers_equal_generate_through_moves_growth_and_holes(model_and_tokenizer, full_width, monkeypatch):
    model, tokenizer = model_and_tokenizer
    if full_width:
        monkeypatch.setattr("raymed.serve.engine.DecodeStep", FullWidthSteps)
    words = "the patient reports a mild fever and a dry cough since tuesday ".split()
    prompt = [tokenizer(" ".join(words[: n % len(words) + 1]) * (1 + n // 5))["input_ids"] for n in range(12)]
    jobs = [  # (prompt, max_tokens, start once the first answer has this many tokens)
        (prompt[0][:3], 300, 0),  # runs past the first 256 columns: the slots grow
        (prompt[11], 6, 4),  # wider than the used columns (they move right); leaves a hole the next fills
        (prompt[2], 20, 4), (prompt[5], 9, 30), (prompt[7], 3, 30),
        (prompt[1], 40, 200),  # after the early ones left, dead columns on the left: moved left
    ]

    async def main():
        engine = BatchingEngine(model, tokenizer, max_batch_size=3, context_length=1024, eos_token_ids=set(),
                                cuda_graphs=False)
        engine.cuda_graphs = full_width  # what a GPU replica does, minus the capture
        progress = [0]
        reached = {n: asyncio.Event() for _, _, n in jobs}

        async def one(ids, max_tokens, start, first=False):
            await reached[start].wait()
            text = ""
            async for event in engine.generate(str(start), ids, SamplingParams(max_tokens=max_tokens, temperature=0)):
                text += event.text
                if first:
                    progress[0] = event.completion_tokens
                    for n, flag in reached.items():
                        if n <= progress[0]:
                            flag.set()
            return text

        reached[0].set()
        texts = await asyncio.gather(*(one(ids, m, s, first=i == 0) for i, (ids, m, s) in enumerate(jobs)))
        return engine, texts

    engine, texts = asyncio.run(main())
    for (ids, max_tokens, _), text in zip(jobs, texts):
        assert text == reference(model_and_tokenizer, ids, max_tokens)
    assert engine.stats.finished == {"length": len(jobs)}
    if full_width:
        assert engine._slots.columns == 512 and engine._decode_step._captured


def test_slot_cache_moves_keep_each_rows_columns():
    """Host-side bookkeeping: starts follow the moves; a newcomer's columns end at `end`."""
    layer = torch.zeros(2, 1, 4, 2)
    slots = SlotCache([(layer, layer)], rows=3, columns=8, max_columns=64)
    assert slots.make_room(0, 4) is False and slots.end == 4
    keys = torch.arange(16.0).reshape(2, 1, 4, 2)
    slots.place(0, [(keys, keys)], torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    assert slots.starts[:2] == [1, 0] and slots.mask[0].tolist() == [False, True, True, True] + [False] * 4
    slots.end = 8  # four decode steps later: the last column is used
    assert slots.make_room(2, 0) is True and slots.columns == 16 and slots.end == 8
    slots.move_rows([1], [0])
    assert slots.starts[0] == 0 and torch.equal(slots.keys[0][0, :, :4], keys[1])
    slots.end = 14
    slots.starts[0] = 10  # only the last 4 columns are live: they move to the left edge
    slots.make_room(1, 0)
    assert (slots.end, slots.starts[0]) == (4, 0)
    with pytest.raises(ValueError, match="more than the 64 allowed"):
        slots.make_room(1, 64)


def test_buckets_are_powers_of_two_up_to_the_batch():
    assert [_bucket(n, 48) for n in (1, 2, 3, 5, 17, 33, 48)] == [1, 2, 4, 8, 32, 48, 48]
