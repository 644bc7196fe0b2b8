"""The batched sampler alone: top-p keeps exactly the nucleus (on both of its paths), a
row's seeded draws do not depend on the other rows, tiny temperatures are greedy, the
on-device draws follow each row's distribution, greedy tokens equal argmax."""

from __future__ import annotations

import torch

from raymed.serve.sampling import NUCLEUS_CANDIDATES, BatchSampler, SamplingParams, greedy_tokens


def reference_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus as a 0/1 mask over the vocabulary, from a full sort of each row."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) <= top_p
    return torch.zeros_like(probs).scatter(-1, order, keep.float())


def test_the_nucleus_is_exact_for_peaked_and_flat_rows_in_one_batch():
    """Peaked rows take their nucleus from the most likely candidates, flat ones from a sort."""
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(4, 1000) * torch.tensor([[8.0], [0.01], [8.0], [0.01]]), dim=-1)
    holds = probs.topk(NUCLEUS_CANDIDATES).values.sum(-1) >= 0.9
    assert holds.tolist() == [True, False, True, False]  # both paths are taken
    kept = BatchSampler._nucleus(probs, torch.full((4, 1), 0.9))
    assert torch.equal((kept > 0).float(), reference_nucleus(probs, 0.9))
    assert torch.equal(kept[kept > 0], probs[kept > 0])


def draws(rows: list[SamplingParams], logits: torch.Tensor, steps: int = 20) -> list[list[int]]:
    sampler = BatchSampler(len(rows), logits.shape[-1], torch.device("cpu"))
    sampler.admit(0, [(params, [0]) for params in rows])
    return list(zip(*[[t.token for t in sampler.sample(logits[: len(rows)])] for _ in range(steps)]))


def test_a_seeded_row_samples_the_same_whatever_its_neighbours():
    torch.manual_seed(1)
    logits = torch.randn(2, 500)
    logits[1] = logits[0]
    alone = draws([SamplingParams(1, temperature=1.0, top_p=0.8, seed=5)], logits)[0]
    together = draws([SamplingParams(1, temperature=1.0, top_p=0.8, seed=5),
                      SamplingParams(1, temperature=0.0, seed=9, frequency_penalty=1.0)], logits)
    assert together[0] == alone
    assert len(set(alone)) > 1  # it does sample
    greedy = int(logits[0].argmax())
    assert together[1][0] == greedy and together[1][1] != greedy  # the penalty acts on its row only


def test_a_tiny_temperature_is_greedy_without_nans():
    logits = torch.randn(1, 300)
    tokens = draws([SamplingParams(1, temperature=1e-300, seed=0)], logits, steps=5)[0]
    assert set(tokens) == {int(logits[0].argmax())}


def test_batched_draws_follow_each_rows_distribution():
    """20,000 rows with the same logits and their own seeds, drawn in one step, against the
    exact temperature + top-p distribution (the per-row reference). Tolerance: total
    variation distance 0.02; sampling noise alone gives about 0.01 here."""
    rows, temperature, top_p = 20_000, 0.8, 0.9
    torch.manual_seed(2)
    logits = torch.randn(1, 32) * 2
    sampler = BatchSampler(rows, 32, torch.device("cpu"))
    sampler.admit(0, [(SamplingParams(1, temperature=temperature, top_p=top_p, seed=seed), [0])
                      for seed in range(rows)])
    tokens = torch.tensor([t.token for t in sampler.sample(logits.expand(rows, -1))])
    probs = torch.softmax(logits[0] / temperature, dim=-1)
    nucleus = probs * reference_nucleus(probs[None], top_p)[0]
    expected = nucleus / nucleus.sum()
    observed = torch.bincount(tokens, minlength=32).float() / rows
    assert float((observed - expected).abs().sum() / 2) < 0.02
    assert observed[expected == 0].sum() == 0  # nothing outside the nucleus


def test_greedy_and_sampled_rows_share_one_step_and_a_seed_repeats():
    torch.manual_seed(3)
    logits = torch.randn(3, 700)
    rows = [SamplingParams(1, temperature=0), SamplingParams(1, temperature=1.0, seed=4),
            SamplingParams(1, temperature=1.0, seed=4)]
    greedy, sampled, twin = draws(rows, torch.stack([logits[0], logits[1], logits[1]]))
    assert set(greedy) == {int(logits[0].argmax())}
    assert sampled == twin and len(set(sampled)) > 1


def test_greedy_tokens_equal_argmax_ties_included():
    logits = torch.randn(5, 49152)
    logits[1, [7, 4000, 9]] = 50.0  # ties: the first index wins, as in argmax
    assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))
    odd = torch.randn(2, 1001)
    assert torch.equal(greedy_tokens(odd), odd.argmax(dim=-1))
