"""The engine's text side, token by token: incremental detokenizing gives the whole text's
decode at every step (accents, emoji and CJK split across tokens included), and a stream
that fell behind gets its backlog as one event."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from raymed.serve.sampling import SamplingParams
from raymed.serve.sequences import Sequence, Texts, TokenEvent, batch_decoder, coalesce, read_texts

TEXT = "Fièvre à 39 °C 🤒 since Tuesday; 咳嗽 and naïve café-style déjà vu — take 500 mg paracetamol.\n\nThen rest."


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gpt2"])
def tokenizer(request, default_assets):
    directory = default_assets / ("models/smollm2-135m-instruct" if request.param != "gpt2" else "tokenizers/gpt2")
    return AutoTokenizer.from_pretrained(directory)


def test_rust_batch_decoder_equals_the_tokenizers_decode(tokenizer):
    ids = tokenizer(TEXT)["input_ids"] + [tokenizer.eos_token_id]
    halves = [ids[: len(ids) // 2], ids[len(ids) // 2:]]
    assert batch_decoder(tokenizer)(halves) == [tokenizer.decode(half, skip_special_tokens=True) for half in halves]


def test_incremental_text_equals_the_whole_decode_at_every_token(tokenizer):
    texts = Texts(tokenizer)
    seq = Sequence("r", [1], SamplingParams(max_tokens=1000), asyncio.Queue())
    for token in tokenizer(TEXT)["input_ids"]:
        seq.generated.append(token)
        read_texts([seq], texts)
        assert seq.text == tokenizer.decode(seq.generated, skip_special_tokens=True)
    assert seq.text == TEXT
    assert seq.read_offset > len(seq.generated) - 5  # the window stayed short


def test_a_backlog_is_sent_as_one_event():
    async def main():
        queue = asyncio.Queue()
        for text, count in (("b", 2), ("c", 3)):
            queue.put_nowait(TokenEvent(text, count))
        queue.put_nowait(TokenEvent("d", 4, "length"))
        queue.put_nowait(TokenEvent("never", 5))  # past the end: left alone
        merged = coalesce(TokenEvent("a", 1), queue)
        return merged, queue.qsize()

    assert asyncio.run(main()) == (TokenEvent("abcd", 4, "length"), 1)


def test_an_error_in_the_backlog_is_raised():
    async def main():
        queue = asyncio.Queue()
        queue.put_nowait(RuntimeError("model step failed"))
        coalesce(TokenEvent("a", 1), queue)

    with pytest.raises(RuntimeError, match="model step failed"):
        asyncio.run(main())
