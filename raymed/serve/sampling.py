"""How requests sample, and one sampling step over a whole batch.

`SamplingParams` is a plain value per request. `BatchSampler` keeps every row's settings as
device tensors (temperature, top_p, penalties, logit bias, counts of the tokens each row
has seen) so that one step applies each logit processor to the batch's logits tensor as one
tensor operation, never a Python loop over rows (vLLM's design): logit bias, then the
repetition penalty, then presence/frequency penalties, then greedy or temperature + top-p
sampling.
The random draws are on the device too: each row's uniform is a hash of its request's seed
and the index of the token being drawn (counter-based, as Philox is), so one tensor
operation draws for every row, and a seeded request gets the same tokens whatever else is
in the batch. The tokens come back to the host once per step.
Logprobs are the model's own (log-softmax of the raw logits, before any processor).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import NamedTuple

import torch


NUCLEUS_CANDIDATES = 128
"""How many of the most likely tokens top-p looks at first (see BatchSampler._nucleus)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples: temperature 0 is greedy; a seed makes sampling repeatable."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    """None: no logprobs; k: each token's logprob and its k most likely alternatives."""

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


class SampledToken(NamedTuple):
    """One row's sampled token (and its logprobs when asked); a tuple: one per row per step."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


class BatchSampler:
    """The running batch's sampling settings (row i = running sequence i); see the module docstring."""

    def __init__(self, rows: int, vocab: int, device: torch.device):
        self.vocab = vocab
        self.params: list[SamplingParams | None] = [None] * rows
        self.temperature = torch.zeros(rows, dtype=torch.float64, device=device)
        self.top_p = torch.ones(rows, dtype=torch.float64, device=device)
        self.presence = torch.zeros(rows, device=device)
        self.frequency = torch.zeros(rows, device=device)
        self.repetition = torch.ones(rows, device=device)
        self.bias = torch.zeros(rows, vocab, device=device)
        self.counts = torch.zeros(rows, vocab, device=device)
        """How often each row generated each token (presence and frequency penalties)."""
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        """Tokens in each row's prompt or answer (repetition penalty)."""
        self.seed = torch.zeros(rows, 2, dtype=torch.long, device=device)
        """Each row's seed as two 32-bit halves (a random one where the request gave none)."""
        self.draws = torch.zeros(rows, dtype=torch.long, device=device)
        """How many tokens each row has drawn: the counter its next uniform hashes."""
        self._version = 0  # changes whenever rows are admitted or moved
        self._uses: tuple[tuple[int, int], dict] = ((-1, -1), {})

    def admit(self, first_row: int, rows: list[tuple[SamplingParams, list[int]]]) -> None:
        """Set up rows `first_row...` for newcomers (their params and prompt ids)."""
        self._version += 1
        for row, (params, prompt_ids) in enumerate(rows, start=first_row):
            self.params[row] = params
            self.temperature[row] = params.temperature
            self.top_p[row] = params.top_p
            self.presence[row] = params.presence_penalty
            self.frequency[row] = params.frequency_penalty
            self.repetition[row] = params.repetition_penalty
            self.bias[row] = 0
            if params.logit_bias:
                ids, values = zip(*params.logit_bias)
                self.bias[row, list(ids)] = torch.tensor(values, device=self.bias.device)
            self.counts[row] = 0
            self.seen[row] = False
            if params.repetition_penalty != 1:
                self.seen[row, prompt_ids] = True
            seed = (params.seed if params.seed is not None else secrets.randbits(64)) % 2**64
            self.seed[row] = torch.tensor([seed & MASK32, seed >> 32])
            self.draws[row] = 0

    def move_rows(self, sources: list[int], targets: list[int]) -> None:
        """Row `sources[i]` becomes row `targets[i]` (the engine compacting its batch)."""
        if not sources:
            return
        self._version += 1
        src = torch.tensor(sources, device=self.bias.device)
        dst = torch.tensor(targets, device=self.bias.device)
        for tensor in (self.temperature, self.top_p, self.presence, self.frequency, self.repetition,
                       self.bias, self.counts, self.seen, self.seed, self.draws):
            tensor[dst] = tensor[src]
        for source, target in zip(sources, targets):
            self.params[target] = self.params[source]

    def sample(self, logits: torch.Tensor) -> list[SampledToken]:
        """Next tokens for rows `0 .. len(logits)`, read back to the host in one transfer."""
        count = logits.shape[0]
        rows, uses = slice(0, count), self._processors(count)
        logits = logits.float()
        raw = logits
        if uses["bias"]:
            logits = logits + self.bias[rows]
        if uses["repetition"]:
            penalty = self.repetition[rows, None]
            logits = torch.where(self.seen[rows], torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        if uses["penalties"]:
            counts = self.counts[rows]
            logits = logits - self.frequency[rows, None] * counts - self.presence[rows, None] * (counts > 0)
        tokens = greedy_tokens(logits)
        if uses["sampled"]:
            tokens = torch.where(self.temperature[rows] > 0, self._draw(logits, rows, uses["top_p"]), tokens)
        self.draws[rows] += 1
        self._count(tokens, rows, uses)
        return self._with_logprobs(raw, tokens, self.params[rows], uses["logprobs"])

    def _processors(self, count: int) -> dict:
        """Which processors the first `count` rows need; worked out again only when the
        batch changed (per step, not per row)."""
        key, uses = self._uses
        if key == (count, self._version):
            return uses
        params = self.params[:count]
        uses = {"bias": any(p.logit_bias for p in params),
                "repetition": any(p.repetition_penalty != 1 for p in params),
                "penalties": any(p.penalised for p in params),
                "sampled": any(p.temperature > 0 for p in params),
                "top_p": any(p.top_p < 1 for p in params),
                "logprobs": max((p.logprobs for p in params if p.logprobs is not None), default=None)}
        self._uses = ((count, self._version), uses)
        return uses

    def _draw(self, logits: torch.Tensor, rows: slice, top_p: bool) -> torch.Tensor:
        """Temperature + top-p sampling for every row at once, by inverse CDF: each row's own
        uniform (from its seed and draw counter) picks its token."""
        # Shifted so each row's largest logit is 0: a tiny temperature then gives -inf, not inf - inf = NaN.
        scaled = (logits - logits.max(dim=-1, keepdim=True).values) / self.temperature[rows, None].float().clamp(
            min=torch.finfo(torch.float32).tiny)
        probs = torch.softmax(scaled, dim=-1)
        if top_p:
            probs = self._nucleus(probs, self.top_p[rows, None].float())
        cdf = probs.cumsum(-1)
        uniform = counter_uniform(self.seed[rows], self.draws[rows])
        picked = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[-1] - 1)
        return picked.squeeze(-1)

    @staticmethod
    def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """`probs` with zeros outside each row's nucleus: the smallest set of most likely
        tokens whose probability reaches its top_p (always the top one). Exact, without
        sorting the vocabulary where it can: a row's nucleus comes from its
        NUCLEUS_CANDIDATES most likely tokens when they hold that much; only the rows they
        do not (flat distributions) are sorted, together."""
        def cut(sorted_probs, top_p):
            return sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs > top_p, 0)

        candidates, ids = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
        kept = torch.zeros_like(probs).scatter_(-1, ids, cut(candidates, top_p))
        wide = (candidates.sum(-1, keepdim=True) < top_p).squeeze(-1)
        if bool(wide.any()):
            rows = wide.nonzero().squeeze(-1)
            sorted_probs, order = probs[rows].sort(dim=-1, descending=True)
            kept[rows] = torch.zeros_like(sorted_probs).scatter_(-1, order, cut(sorted_probs, top_p[rows]))
        return kept

    def _count(self, tokens: torch.Tensor, rows: slice, uses: dict) -> None:
        if uses["penalties"]:
            self.counts[rows].scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=torch.float))
        if uses["repetition"]:
            self.seen[rows].scatter_(1, tokens[:, None], True)

    @staticmethod
    def _with_logprobs(raw, tokens, params, most: int | None) -> list[SampledToken]:
        token_list = tokens.tolist()  # every row's, in one transfer
        if most is None:
            return [SampledToken(token) for token in token_list]
        logprobs = torch.log_softmax(raw, dim=-1)
        chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1).tolist()
        top_values, top_ids = logprobs.topk(most, dim=-1) if most else (None, None)
        top_values = top_values.tolist() if top_values is not None else None
        top_ids = top_ids.tolist() if top_ids is not None else None
        out = []
        for i, (token, p) in enumerate(zip(token_list, params)):
            if p.logprobs is None:
                out.append(SampledToken(token))
                continue
            top = tuple(zip(top_ids[i][: p.logprobs], top_values[i][: p.logprobs])) if p.logprobs else ()
            out.append(SampledToken(token, chosen[i], top))
        return out


ARGMAX_GROUP = 64


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)`, faster on a CPU: the largest value of each group of ARGMAX_GROUP
    columns, the first group holding the row's largest, then the argmax within that group
    (the same first index on ties). torch's CPU argmax over a 49,216-wide row is the slow part
    (64 rows, one thread: 4.5 ms against 0.9 ms)."""
    rows, vocab = logits.shape
    if vocab % ARGMAX_GROUP:
        return logits.argmax(dim=-1)
    groups = logits.view(rows, vocab // ARGMAX_GROUP, ARGMAX_GROUP)
    best = groups.amax(dim=-1).argmax(dim=-1)
    inner = groups[torch.arange(rows, device=logits.device), best].argmax(dim=-1)
    return best * ARGMAX_GROUP + inner


MASK32 = 0xFFFFFFFF


def counter_uniform(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """One uniform in (0, 1) per row from its seed halves ([rows, 2]) and counter ([rows]):
    murmur3's 32-bit finaliser chained over the three words, in int64 tensor arithmetic
    that never overflows. The same (seed, counter) gives the same number on any device."""
    mixed = _fmix32(counter & MASK32)
    mixed = _fmix32(mixed ^ seed[:, 1])
    mixed = _fmix32(mixed ^ seed[:, 0])
    return ((mixed >> 8).float() + 0.5) * 2.0 ** -24


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _times32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _times32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _times32(h: torch.Tensor, constant: int) -> torch.Tensor:
    """(h * constant) mod 2**32 for h < 2**32, split in 16-bit halves of the constant so
    that no int64 product overflows."""
    low = h * (constant & 0xFFFF)
    high = ((h * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def prompt_logprobs(model, prompt_ids: list[int], top: int) -> list[SampledToken | None]:
    """Each prompt token's logprob given the tokens before it (None for the first), with its
    `top` most likely alternatives: what harnesses score with `echo` + `logprobs`."""
    ids = torch.tensor([prompt_ids], device=model.device)
    logits = model(input_ids=ids).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = ids[0, 1:]
    chosen = logprobs.gather(-1, targets[:, None]).squeeze(-1).tolist()
    tops = [()] * len(chosen)
    if top:
        values, top_ids = logprobs.topk(top, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())]
    return [None] + [SampledToken(t, lp, tp) for t, lp, tp in zip(targets.tolist(), chosen, tops)]
