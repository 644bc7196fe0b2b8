"""Validation over every block: the loss, perplexity and next-token accuracy each worker
scores on its share, summed over workers (the same computation as `raymed eval`)."""

from __future__ import annotations

import torch

from raymed.data.records import IGNORE_INDEX
from raymed.train.metrics import token_metrics, val_metrics


def validate(model, batches, device="cpu", sum_over_ranks=lambda t: t) -> dict[str, float]:
    """val_loss, val_ppl and val_token_acc over `batches` (this rank's share of every
    validation block), summed across all workers by `sum_over_ranks`."""
    totals = torch.zeros(3, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            totals += torch.tensor(token_metrics(logits, batch["labels"]), dtype=torch.float64)
    model.train()
    loss_sum, correct, count = sum_over_ranks(totals.to(device)).cpu().tolist()
    return val_metrics(loss_sum, int(correct), int(count))


def in_lockstep(batches, filler: dict[str, torch.Tensor], any_rank):
    """`batches`, then `filler` for as long as another rank still has batches, so that all
    ranks run the same number of forwards. `any_rank(flag)` is true when `flag` is on any."""
    batches = iter(batches)
    while True:
        batch = next(batches, None)
        if not any_rank(batch is not None):
            return
        yield filler if batch is None else batch


def unscored_batch(block_size: int) -> dict[str, torch.Tensor]:
    """One block with no labelled token: its forward adds nothing to validation's totals."""
    return {"input_ids": torch.zeros(1, block_size, dtype=torch.long),
            "position_ids": torch.arange(block_size).unsqueeze(0),
            "labels": torch.full((1, block_size), IGNORE_INDEX)}
