"""One request inside the batching engine (raymed.serve.engine): its tokens, its text
decoded incrementally, its stop checks, and the events its stream yields."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

from raymed.serve.sampling import SampledToken, SamplingParams


class TokenEvent(NamedTuple):
    """What a request's stream yields: new text since the last event, the completion's
    token count so far, the finish reason on the last event (`stop`, `length` or `error`),
    and the new tokens' logprobs when the request asked for them: `{"token", "logprob",
    "top": [[token, logprob], ...]}` each, tokens as text."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None
    logprobs: tuple[dict, ...] = ()


class Texts:
    """A tokenizer's text side as the engine uses it: ids to text (special tokens skipped),
    and one token's own text (special tokens included, cached: what logprobs name)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decode_many = batch_decoder(tokenizer)
        self._token_texts: dict[int, str] = {}

    def token(self, token: int) -> str:
        if token not in self._token_texts:
            self._token_texts[token] = self.tokenizer.decode([token])
        return self._token_texts[token]

    def logprob_entry(self, sampled: SampledToken) -> dict:
        return {"token": self.token(sampled.token), "logprob": sampled.logprob,
                "top": [[self.token(token), logprob] for token, logprob in sampled.top]}


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    decoded: str = ""  # the text of generated[:read_offset]
    window_head: str = ""  # the text of generated[prefix_offset:read_offset]
    text: str = ""  # the text of all generated tokens (held-back stop prefixes included)
    pending_logprobs: list[dict] = field(default_factory=list)  # not yet sent
    prefix_offset: int = 0  # where the decoding window starts (see Sequence.window)
    read_offset: int = 0
    emitted_text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False

    @property
    def position(self) -> int:
        """Position id of the last generated token (the one fed to the next step)."""
        return len(self.prompt_ids) + len(self.generated) - 1

    def add(self, sampled: SampledToken, texts: Texts, eos_token_ids: set[int]) -> bool:
        """Append a sampled token (and its logprobs); whether it ends the sequence."""
        self.generated.append(sampled.token)
        if self.params.logprobs is not None:
            self.pending_logprobs.append(texts.logprob_entry(sampled))
        return sampled.token in eos_token_ids

    def window(self) -> list[int]:
        """The tokens whose text `read` takes next (vLLM's incremental detokenizer): the
        window starts one emission back, so the tokens that merge across its edge (and an
        unfinished UTF-8 character) decode as in the whole text."""
        return self.generated[self.prefix_offset:]

    def read(self, window_text: str) -> list[int] | None:
        """Update `text` from the window's text. When the window moves on, return the
        tokens its new head holds: their text is the next `window_head`."""
        if len(window_text) <= len(self.window_head) or window_text.endswith("\ufffd"):
            self.text = self.decoded + window_text[len(self.window_head):]
            return None
        self.decoded += window_text[len(self.window_head):]
        self.text = self.decoded
        self.prefix_offset, self.read_offset = self.read_offset, len(self.generated)
        return self.generated[self.prefix_offset: self.read_offset]

    def next_event(self, ended: bool, context_length: int) -> TokenEvent | None:
        """The event the last token makes (None: nothing new to show); `text` is read."""
        text = self.text  # at an end of sequence: the text so far, held-back stop prefixes included
        if ended:
            return self.finish("stop", text)
        stops = self.params.stop
        if stops:
            cut = first_stop(text, stops)
            if cut is not None:
                return self.finish("stop", text[:cut])
        if len(self.generated) >= self.params.max_tokens or self.position + 1 >= context_length:
            return self.finish("length", text)
        shown = text[: len(text) - held_back(text, stops)] if stops or text.endswith("\ufffd") else text
        if len(shown) <= len(self.emitted_text):
            return None
        return self.event(shown)

    def finish(self, reason: str, text: str) -> TokenEvent:
        self.finish_reason = reason
        return self.event(text)

    def event(self, text: str) -> TokenEvent:
        delta = text[len(self.emitted_text):]
        self.emitted_text = text
        logprobs, self.pending_logprobs = tuple(self.pending_logprobs), []
        return TokenEvent(delta, len(self.generated), self.finish_reason, logprobs)


def read_texts(seqs: list[Sequence], texts: Texts) -> None:
    """Bring every sequence's `text` up to its last token: all windows decoded in one call,
    then the heads of the windows that moved in another (two calls per step, not per row)."""
    if not seqs:
        return
    windows = texts.decode_many([seq.window() for seq in seqs])
    moved = [(seq, head) for seq, window in zip(seqs, windows) if (head := seq.read(window)) is not None]
    if moved:
        for (seq, _), text in zip(moved, texts.decode_many([head for _, head in moved])):
            seq.window_head = text


def batch_decoder(tokenizer) -> Callable[[list[list[int]]], list[str]]:
    """Each id list's `tokenizer.decode(ids, skip_special_tokens=True)`, straight to the Rust
    tokenizer when the Python wrapper would add only its per-id type checks (most of the cost
    per token). One call per list: for a batch's few-token windows that measured faster than
    the Rust `decode_batch` (64 windows, 2 cores: 35 against 66 µs)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        decode = partial(backend.decode, skip_special_tokens=True)
    else:
        decode = partial(tokenizer.decode, skip_special_tokens=True)
    return lambda id_lists: [decode(ids) for ids in id_lists]


def coalesce(event: TokenEvent | BaseException, queue: asyncio.Queue) -> TokenEvent:
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


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
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
