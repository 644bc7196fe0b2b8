"""Each Ray Train worker's distillation loop: the fine-tuning loop (raymed.train.loop) with a
frozen teacher beside the student and the loss of raymed.distill.loss. Steps, validation
(the student's cross-entropy), checkpoints of the student, resume, TensorBoard, top-K and
the NaN stop are the fine-tuning loop's own."""

from __future__ import annotations

import torch

from raymed.config import Config
from raymed.distill.loss import summed_kd_loss
from raymed.distill.student import load_teacher
from raymed.train.loop import WorkerLoop


def distill_loop_per_worker(config_data: dict) -> None:
    """One worker's distillation (runs inside Ray Train)."""
    DistillLoop(Config.model_validate(config_data)).run()


class DistillLoop(WorkerLoop):
    """A worker of the fine-tuning loop whose student also learns the teacher's next-token
    distributions. The teacher is whole on every worker (neither DDP-wrapped nor sharded:
    it has no gradients to reduce), in eval mode, run without autograd."""

    def __init__(self, config: Config):
        super().__init__(config)
        self.teacher = load_teacher(config.distill.teacher, self.device)
        self.vocab = len(self.tokenizer)

    def _losses(self, batch: dict[str, torch.Tensor], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """`train_loss` = (1 − α)·`ce_loss` + α·`kd_loss`, each a sum over this micro-batch's
        labelled tokens divided by the step's (as fine-tuning's loss is)."""
        distill = self.config.distill
        student = self.forward(**batch, num_items_in_batch=tokens)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        kd_loss = summed_kd_loss(student.logits, teacher_logits, batch["labels"], distill.temperature,
                                 self.vocab) / tokens
        return {"train_loss": (1 - distill.alpha) * student.loss + distill.alpha * kd_loss,
                "ce_loss": student.loss, "kd_loss": kd_loss}
