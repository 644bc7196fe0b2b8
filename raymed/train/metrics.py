"""Next-token metrics over labelled tokens, shared by training's validation and by
`raymed eval` (the same computation, so their `val_loss` agree on the same blocks).

A block's position t predicts token t+1; a token counts when its label is not -100.
"""

from __future__ import annotations

import math

import torch

from raymed.data.records import IGNORE_INDEX
from raymed.errors import RaymedError


def labelled_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens of `labels` are predicted and scored (the loss's denominator)."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


def token_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """Summed next-token loss, correct predictions, and counted tokens (labels != -100)."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    mask = targets != IGNORE_INDEX
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    correct = ((logits.argmax(-1) == targets) & mask).sum()
    return loss.item(), int(correct), int(mask.sum())


def val_metrics(loss_sum: float, correct: int, count: int) -> dict[str, float]:
    """val_loss (mean next-token loss), val_ppl = exp(val_loss), val_token_acc."""
    if count == 0:
        raise RaymedError("the validation data has no tokens to score: give more data or a validation_path")
    val_loss = loss_sum / count
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)), "val_token_acc": correct / count}
