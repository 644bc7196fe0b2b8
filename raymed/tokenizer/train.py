"""A byte-level BPE tokenizer trained on a corpus, saved as a Hugging Face tokenizer directory.

The corpus is read with the data stage's readers (Ray Data) and streamed to the trainer
batch by batch (`train_from_iterator`), never held in memory as a list. The tokenizer is
GPT-2-style byte-level BPE (the pre-tokenizer, decoder and post-processor SmolLM2's uses),
its initial alphabet all 256 byte symbols, so any text encodes and decodes back exactly.
Special tokens take the lowest ids, in SPECIAL_TOKENS order, and the chat template is
ChatML, as SmolLM2's (without its default system prompt).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa

from raymed.errors import RaymedError

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
"""Ids 0, 1, 2, 3. `<|im_start|>`/`<|im_end|>` open and close a chat turn (bos and eos, as in
SmolLM2; eos ends a plain-text record too, so generation stops there); `<|pad|>` pads and is
nothing else; `<|endoftext|>` is a document separator for corpora that want one."""
BOS, EOS, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
SUMMARY_FILE = "raymed_tokenizer.json"
READ_BATCH = 1024


def train_tokenizer(corpus: str, out: Path, vocab_size: int, shape: str = "auto", force: bool = False) -> dict:
    """Train on `corpus` (any path the data stage reads) and write the tokenizer directory to
    `out` (whole, or not at all); a summary of what was read and made, also saved in `out`."""
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not force:
        raise RaymedError(f"{out} exists and is not empty: choose another --out or pass --force")
    started = time.monotonic()
    bad: Counter[str] = Counter()
    texts = _Counted(corpus_texts(corpus, shape, bad))
    tokenizer = train_bpe(texts, vocab_size)
    if texts.count == 0:
        raise RaymedError(f"{corpus} has no text to train a tokenizer on ({_reasons(bad) or 'empty'})")
    summary = {"corpus": corpus, "vocab_size_requested": vocab_size, "vocab_size": len(tokenizer),
               "special_tokens": {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS},
               "records": texts.count, "bad_rows": dict(sorted(bad.items())),
               "seconds": round(time.monotonic() - started, 1)}
    _save_whole(tokenizer, summary, out)
    return summary


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A PreTrainedTokenizerFast trained on `texts` (consumed once, as a stream) with up to
    `vocab_size` ids, special tokens included (fewer when the corpus has fewer merges to make)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise RaymedError(f"vocab size {vocab_size} is below the {MIN_VOCAB_SIZE} ids that the 256 bytes "
                          f"and {len(SPECIAL_TOKENS)} special tokens take")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE)


class _Counted:
    """An iterable that counts what it yields (once through)."""

    def __init__(self, items: Iterator[str]):
        self.items, self.count = items, 0

    def __iter__(self):
        for item in self.items:
            self.count += 1
            yield item


def corpus_texts(path: str, shape: str, bad: Counter) -> Iterator[str]:
    """The training text of each good record of `path`, streamed from Ray Data; bad rows are
    counted into `bad` by reason (the data stage's reasons) as the stream passes them."""
    from raymed.data.pipeline import detect_corpus_shape, read_records

    raw = read_records(path)
    if shape == "auto":
        shape = detect_corpus_shape(raw)
    texts = raw.map_batches(_texts_batch, fn_kwargs={"shape": shape}, batch_format="pyarrow")
    for batch in texts.iter_batches(batch_format="pyarrow", batch_size=READ_BATCH):
        for text, error in zip(batch.column("text").to_pylist(), batch.column("error").to_pylist()):
            if error:
                bad[error] += 1
            else:
                yield text


def record_text(record: dict, shape: str) -> str:
    """What the chat template puts between a record's special tokens: each turn's role and
    content (a plain-text record's text as it is). The special tokens themselves are not
    trained on (they are whole tokens already)."""
    from raymed.data.records import to_messages

    messages = to_messages(record, shape)
    if isinstance(messages, str):
        return messages
    return "\n".join(f"{m['role']}\n{m['content']}" for m in messages)


def _texts_batch(batch: pa.Table, shape: str) -> pa.Table:
    from raymed.data.records import BadRecord

    texts, errors = [], []
    for row in batch.select(["record", "error"]).to_pylist():
        text, error = "", row["error"]
        if not error:
            try:
                text = record_text(json.loads(row["record"]), shape)
            except BadRecord as err:
                error = err.reason
        texts.append(text)
        errors.append(error)
    return pa.table({"text": texts, "error": errors})


def _reasons(bad: Counter) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(bad.items()))


def _save_whole(tokenizer, summary: dict, out: Path) -> None:
    """Write into a staging directory beside `out`, then move it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer.save_pretrained(staging)
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
