"""Prefill under a per-step token budget (`serve.max_num_batched_tokens`).

Each engine step decodes one token for every running sequence and spends what is left of
the budget on prompts: first those that fit whole (run as one left-padded batch, padding
counted), then the next chunk of at most one long prompt, whose keys and values stay in its
own cache between steps until its last chunk runs. A prompt is long when it has more than
`serve.long_prefill_token_threshold` tokens (vLLM's name) or does not fit the step; its chunks
are at most that long. So a long prompt never stalls the decoding sequences for longer than
one chunk, and a short prompt that arrives behind it does not wait for it: a step that
prefills whole prompts skips the chunk, unless the chunk was skipped in the step before, so
neither kind starves the other (and whole prompts then take at most half the budget).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from raymed.serve.sequences import Sequence

Prefilled = tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]
"""A finished prefill: every layer's (keys, values), the [rows, width] mask of real tokens
(left-padded), and each row's last-position logits."""


@dataclass
class PrefillPlan:
    """One step's prefill work."""

    whole: list[Sequence] = field(default_factory=list)
    chunk_tokens: int = 0  # of the prompt being chunked (Prefiller.chunking)


class Prefiller:
    """Plans each step's prefill work (on the event loop, between steps) and runs it (on
    the decode thread); see the module docstring."""

    def __init__(self, model, cache_arg: str, pad_token_id: int, max_rows: int, max_tokens: int, chunk_tokens: int):
        self.model, self.cache_arg, self.pad_token_id = model, cache_arg, pad_token_id
        self.max_rows, self.max_tokens, self.chunk_tokens = max_rows, max_tokens, chunk_tokens
        self.chunking: Sequence | None = None
        self._chunk_cache = None
        self._chunk_done = 0  # prompt tokens of `chunking` already in its cache
        self._chunk_skipped = False  # the last step prefilled whole prompts instead of the chunk

    def plan(self, waiting: deque[Sequence], running: int) -> PrefillPlan:
        """Take this step's prompts out of `waiting` (dropping cancelled ones); `running`
        sequences decode a token each in the same step."""
        budget = self.max_tokens - running
        longest_whole = min(budget, self.chunk_tokens)
        rows = self.max_rows - running - (self.chunking is not None)
        if self.chunking is None and rows > 0:
            self.chunking = _take_first(waiting, lambda seq: len(seq.prompt_ids) > longest_whole)
            rows -= self.chunking is not None
        whole = _take_whole(waiting, rows, budget // 2 if self.chunking is not None else budget, longest_whole)
        used = len(whole) * max((len(seq.prompt_ids) for seq in whole), default=0)
        chunk_tokens = 0
        if self.chunking is not None and (self._chunk_skipped or not whole):
            chunk_tokens = min(len(self.chunking.prompt_ids) - self._chunk_done, budget - used, self.chunk_tokens)
        self._chunk_skipped = self.chunking is not None and chunk_tokens == 0
        return PrefillPlan(whole, chunk_tokens)

    def forget_chunk(self) -> Sequence | None:
        """Drop the prompt being chunked (failed, cancelled, or its batch gone); return it."""
        seq, self.chunking, self._chunk_cache, self._chunk_done = self.chunking, None, None, 0
        return seq

    def whole(self, seqs: list[Sequence]) -> Prefilled:
        """Prefill `seqs` as one left-padded batch."""
        width = max(len(seq.prompt_ids) for seq in seqs)
        pad = self.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(s.prompt_ids)) + s.prompt_ids for s in seqs])
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in seqs])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        logits = self._forward(cache, input_ids=input_ids, attention_mask=mask, position_ids=positions)
        return _layers(cache), mask, logits

    def next_chunk(self, tokens: int) -> Prefilled | None:
        """Run the next `tokens` prompt tokens of `chunking`; the prefill once its last chunk
        has run (and `chunking` is then cleared), else None."""
        seq, start = self.chunking, self._chunk_done
        if self._chunk_cache is None:
            self._chunk_cache = self._new_cache()
        ids = seq.prompt_ids[start: start + tokens]
        logits = self._forward(self._chunk_cache, input_ids=torch.tensor([ids]),
                               position_ids=torch.arange(start, start + len(ids))[None])
        self._chunk_done += len(ids)
        if self._chunk_done < len(seq.prompt_ids):
            return None
        layers = _layers(self._chunk_cache)
        self.forget_chunk()
        return layers, torch.ones(1, len(seq.prompt_ids), dtype=torch.long), logits

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _forward(self, cache, **inputs) -> torch.Tensor:
        device = self.model.device
        out = self.model(**{name: value.to(device) for name, value in inputs.items()}, use_cache=True,
                         logits_to_keep=1, **{self.cache_arg: cache})
        return out.logits[:, -1, :]


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _take_first(waiting: deque[Sequence], wanted) -> Sequence | None:
    """Remove and return the first live sequence `wanted` accepts (dropping cancelled ones)."""
    for seq in list(waiting):
        if seq.cancelled:
            waiting.remove(seq)
        elif wanted(seq):
            waiting.remove(seq)
            return seq
    return None


def _take_whole(waiting: deque[Sequence], rows: int, budget: int, longest: int) -> list[Sequence]:
    """Remove, in arrival order, the prompts of at most `longest` tokens that fit whole into
    `rows` rows and `budget` padded tokens; the others keep their places."""
    taken, width, kept = [], 0, deque()
    while waiting:
        seq = waiting.popleft()
        if seq.cancelled:
            continue
        wider = max(width, len(seq.prompt_ids))
        if len(taken) < rows and len(seq.prompt_ids) <= longest and wider * (len(taken) + 1) <= budget:
            taken.append(seq)
            width = wider
        else:
            kept.append(seq)
    waiting.extend(kept)
    return taken
