"""The batched sampler alone: top-p keeps exactly the nucleus (on both of its paths), a
row's seeded draws do not depend on the other rows, tiny temperatures are greedy."""

from __future__ import annotations

import torch

from raymed.serve.sampling import NUCLEUS_CANDIDATES, BatchSampler, SamplingParams


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
    generators = [torch.Generator().manual_seed(params.seed) for params in rows]
    return list(zip(*[[t.token for t in sampler.sample(logits[: len(rows)], 0, generators)] for _ in range(steps)]))


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
