"""The distillation loss: the student's cross-entropy on the labels, mixed with how far its
next-token distribution is from the frozen teacher's,

    loss = (1 − α)·CE(student, labels) + α·T²·KL(p_teacher^T ‖ p_student^T)

where p^T = softmax(logits / T). Following Hinton, Vinyals & Dean, "Distilling the Knowledge
in a Neural Network" (2015): soft targets at temperature T, the T² factor keeping the soft
term's gradients on the hard term's scale whatever T is. As in torchtune's knowledge-
distillation recipe (`recipes/knowledge_distillation_distributed.py`: `(1 - kd_ratio) *
class_loss + kd_ratio * kd_loss`, with `ForwardKLLoss` in `torchtune/modules/loss/
kd_losses.py`), the forward KL counts only labelled positions (labels != -100) and both
terms are means over the same labelled tokens. torchtune drops the teacher's entropy (a
constant: same gradients); here it is kept, so a student equal to its teacher scores 0.
TRL's GKD trainer (β = 0, forward KL) and DistillKit's logit distillation use this form.

Everything is computed in fp32, and only over the labelled positions' logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raymed.data.records import IGNORE_INDEX


def summed_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                   temperature: float, vocab: int) -> torch.Tensor:
    """T²·KL(p_teacher^T ‖ p_student^T) summed over the labelled positions (position t's
    logits predict token t+1, as in the cross-entropy), over the first `vocab` logits (the
    tokenizer's ids: an embedding padded past them has rows no text uses)."""
    scored = labels[:, 1:] != IGNORE_INDEX
    student = student_logits[:, :-1][scored][:, :vocab].float() / temperature
    teacher = teacher_logits[:, :-1][scored][:, :vocab].float() / temperature
    kl = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True, reduction="sum")
    return temperature ** 2 * kl

