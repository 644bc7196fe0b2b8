"""The `train` section of the config: Ray Train fine-tuning (its own module, as the section
with the most cross-field rules; `from raymed.config import TrainConfig` works as ever)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raymed.config_section import Section


class TrainConfig(Section):
    """Ray Train fine-tuning."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, gt=0)
    """With use_gpu: a fraction (e.g. 0.5) packs several Tune trials onto one GPU."""
    lr: float = Field(5e-5, gt=0, lt=1)
    warmup_steps: int = Field(10, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    """When set, the warmup is this fraction of max_steps (and warmup_steps is ignored)."""
    lr_schedule: Literal["linear", "cosine"] = "linear"
    max_steps: int = Field(100, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """`ddp`: every worker holds the whole model, its gradients and optimizer state;
    `fsdp`: PyTorch FSDP2 shards all three across the workers (docs/fsdp.md)."""
    fsdp_reshard_after_forward: bool | None = None
    """With `strategy: fsdp`: free each layer's gathered parameters after its forward (less
    memory, one more all-gather in backward). Unset: true."""
    cpu_offload: bool = False
    """With `strategy: fsdp` on GPUs: keep the sharded parameters, gradients and optimizer
    state in CPU memory between uses."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them."""
    scope: Literal["full", "top_layers", "lora"] = "full"
    top_layers: int | None = Field(None, ge=1)
    """With `scope: top_layers`: how many of the last transformer layers train."""
    lora_r: int = Field(8, ge=1)
    """With `scope: lora`: the adapters' rank."""
    lora_alpha: float = Field(16, gt=0)
    bf16: bool = False
    compile: bool = False
    eval_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    """Read the training loss from the device every N steps (and on the first, checkpoint
    and last steps), in one transfer: fewer GPU syncs; metrics.jsonl still gets every step."""
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0)
    peak_tflops: float = Field(989, gt=0)
    """The accelerator's dense bf16 peak, for MFU (989: an H100 SXM)."""

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if (self.scope == "top_layers") != (self.top_layers is not None):
            raise ValueError("scope: top_layers and train.top_layers go together")
        if self.effective_warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.effective_warmup_steps}) must be < max_steps ({self.max_steps})"
            )
        if (self.bf16 or self.compile) and not self.use_gpu:
            raise ValueError("bf16 and compile need use_gpu: true")
        self._check_fsdp_options()
        return self

    def _check_fsdp_options(self) -> None:
        """FSDP's own options only mean something under it: given with `ddp`, they are errors."""
        given = {"fsdp_reshard_after_forward": self.fsdp_reshard_after_forward is not None,
                 "cpu_offload": self.cpu_offload}
        for option, is_given in given.items():
            if is_given and self.strategy != "fsdp":
                raise ValueError(f"train.{option} needs train.strategy: fsdp (it is {self.strategy})")
        if self.cpu_offload and not self.use_gpu:
            raise ValueError("train.cpu_offload moves sharded state off the GPU: it needs train.use_gpu: true")

    @property
    def reshard_after_forward(self) -> bool:
        return self.fsdp_reshard_after_forward is not False

    @property
    def effective_warmup_steps(self) -> int:
        if self.warmup_ratio is not None:
            return round(self.warmup_ratio * self.max_steps)
        return self.warmup_steps
