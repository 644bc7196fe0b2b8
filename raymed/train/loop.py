"""The training loop each Ray Train worker runs: DDP steps with a token-weighted loss,
validation over every block, checkpoints reported to Ray Train, and resume."""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from functools import partial
from itertools import islice
from pathlib import Path

import torch
from tqdm import tqdm

from raymed.config import Config
from raymed.errors import RaymedError
from raymed.tokenizer.task_tokens import optimizer_groups, task_token_ids
from raymed.train.checkpoint import (
    STATE_FILE,
    load_checkpoint_model,
    load_tensors,
    newest_complete,
    remove_unregistered,
    write_checkpoint,
)
from raymed.train.metrics import labelled_tokens, token_metrics, val_metrics
from raymed.train.model import apply_scope, build_model, flops_per_token, load_tokenizer, unwrap
from raymed.train.runlog import RunLog
from raymed.train.paths import checkpoints_dir, train_dir


def train_loop_per_worker(config_data: dict) -> None:
    """One worker's loop (runs inside Ray Train)."""
    WorkerLoop(Config.model_validate(config_data)).run()


class WorkerLoop:
    """One DDP worker: its model, optimizer, schedule, data stream and throughput clocks.
    Rank 0 also keeps the run log and the progress bar."""

    def __init__(self, config: Config):
        import ray.train
        import ray.train.torch
        from ray.train.torch import prepare_model
        from transformers import get_scheduler

        self.config, train = config, config.train
        torch.manual_seed(config.seed)
        if train.use_gpu:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.tokenizer = load_tokenizer(config.model)
        new_rows = task_token_ids(self.tokenizer, config.model.add_tokens)
        self.model = prepare_model(apply_scope(build_model(config.model, self.tokenizer), train, new_rows))
        self.device = ray.train.torch.get_device()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(optimizer_groups(self.params, train.weight_decay), lr=train.lr,
                                           fused=train.use_gpu)
        self.forward = torch.compile(self.model) if train.compile else self.model
        self.autocast = partial(torch.autocast, self.device.type, dtype=torch.bfloat16, enabled=train.bf16)
        self.scheduler = get_scheduler(train.lr_schedule, self.optimizer,
                                       train.effective_warmup_steps, train.max_steps)
        context = ray.train.get_context()
        self.rank0, self.world = context.get_world_rank() == 0, context.get_world_size()
        self.log = RunLog(train_dir(config) / "logs") if self.rank0 else None
        self.resumed_unregistered = False
        self.step, self.position = self._resume()
        self.start_step = self.step
        self.flops_per_token = flops_per_token(unwrap(self.model), config.data.block_size)
        self._restart_clocks()

    def _restart_clocks(self) -> None:
        self.started = time.perf_counter()
        self.timed_from_step = self.step
        self.tokens, self.waited, self.validating = 0, 0.0, 0.0

    def run(self) -> None:
        """Train to `max_steps`. A step's loss stays on the device until a read step (the
        first, every `log_every`-th, and each checkpoint step), which reads all pending ones
        in one transfer and logs their lines: in between, the host queues the next step while
        the GPU still runs this one."""
        from raymed.data.handoff import prefetched

        train = self.config.train
        stream = prefetched(islice(endless_epochs(self._train_batches), self.position, None),
                            pin_memory=self.device.type == "cuda")
        progress = tqdm(total=train.max_steps, initial=self.step, desc="train", disable=not self.rank0)
        self._restart_clocks()
        pending: list[dict] = []  # the steps not logged yet, their train_loss still a device tensor
        while self.step < train.max_steps:
            lr = self.scheduler.get_last_lr()[0]  # the rate this step trains at
            loss = self._train_step(stream)
            pending.append({"step": self.step, "train_loss": loss, "lr": lr})
            checkpoint = self.step % train.eval_every == 0 or self.step == train.max_steps
            first = self.step == self.start_step + 1
            read = checkpoint or first or self.step % train.log_every == 0
            if read:
                read_losses(pending, self._sum_over_ranks)  # a non-finite loss stops the run here
            # Timed after that sync, so a read step's speed counts all the GPU work queued so far.
            pending[-1] = self._throughput() | pending[-1]
            if checkpoint:
                pending[-1] |= self._validate()
            if self.rank0:
                progress.update(1)
                if read:  # logged before the checkpoint exists: a step resumed past is never unlogged
                    for metrics in pending:
                        self.log.log(metrics)
                    progress.set_postfix(loss=f"{pending[-1]['train_loss']:.3f}")
            if checkpoint:
                self._report_with_checkpoint(pending[-1])
            if first and self.step < train.max_steps:
                self._restart_clocks()  # speed is steady-state: the first step compiles and warms caches
            if read:
                pending = []
        progress.close()
        if self.rank0:
            self._forget_unregistered()
            self.log.close()

    def _train_batches(self):
        from raymed.data.handoff import worker_batches

        return worker_batches("train", self.config.train.micro_batch_size,
                              deterministic=self.config.data.deterministic)

    def _train_step(self, stream) -> torch.Tensor:
        """One optimizer step over `grad_accum` micro-batches. Every labelled token weighs
        the same, whichever micro-batch or rank holds it: each micro-batch's summed token
        loss is divided by the step's labelled tokens counted over all ranks. Returns this
        rank's share of the step's mean loss, left on the device (detached) so that the host
        need not wait for the GPU."""
        batches = [self._next_batch(stream) for _ in range(self.config.train.grad_accum)]
        tokens = torch.stack([labelled_tokens(b["labels"]) for b in batches]).sum()
        tokens = self._sum_over_ranks(tokens.to(self.device, non_blocking=True))
        loss_sum = torch.zeros((), device=self.device)
        for index, batch in enumerate(batches):
            with self._gradient_sync(index == len(batches) - 1), self.autocast():
                loss = self.forward(**batch, num_items_in_batch=tokens).loss
            # DDP averages gradients over ranks; the loss is over all ranks' tokens already.
            (loss * self.world).backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_sum

    def _next_batch(self, stream) -> dict[str, torch.Tensor]:
        fetch = time.perf_counter()
        batch = next(stream)
        self.tokens += int(batch.pop("real_tokens").sum())
        self.position += 1
        self.waited += time.perf_counter() - fetch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _gradient_sync(self, last_micro_batch: bool):
        """DDP all-reduces gradients on the step's last micro-batch only (`no_sync` before it)."""
        if last_micro_batch or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def _throughput(self) -> dict[str, float]:
        """Speed since this attempt's first step (since its start, on that step), validation
        and checkpoint time excluded."""
        elapsed = time.perf_counter() - self.started - self.validating
        metrics = {"step": self.step, "tokens_per_s": self.tokens / elapsed,
                   "step_time_s": elapsed / (self.step - self.timed_from_step),
                   "data_wait_frac": self.waited / elapsed}
        if self.config.train.use_gpu:  # all workers' FLOPs over the peak of all their GPUs
            metrics["mfu"] = self.flops_per_token * self.tokens / elapsed / (self.config.train.peak_tflops * 1e12)
        return metrics

    def _validate(self) -> dict[str, float]:
        """Validation metrics over every block, this rank scoring its share."""
        from raymed.data.handoff import validation_batches

        started = time.perf_counter()
        with self.autocast():
            val = validate(unwrap(self.model), validation_batches(self.config.train.micro_batch_size),
                           self.device, self._sum_over_ranks)
        _check_finite("validation loss", val["val_loss"], self.step)
        self.validating += time.perf_counter() - started
        return val

    def _report_with_checkpoint(self, metrics: dict) -> None:
        """The step's metrics, reported to Ray Train with a checkpoint (written by rank 0)."""
        import ray.train
        from ray.train import Checkpoint

        started = time.perf_counter()
        state = {"step": self.step, "data_position": self.position, "attempt_started_at_step": self.start_step}
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if self.rank0:
                write_checkpoint(Path(directory), unwrap(self.model), self.tokenizer, self.optimizer,
                                 self.scheduler, state)
                checkpoint = Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint)
        self.validating += time.perf_counter() - started

    def _resume(self) -> tuple[int, int]:
        """(step, data position) after loading the latest checkpoint's state: Ray Train's
        latest registered one, or a newer one raymed wrote completely that Ray had not yet
        registered when the last attempt died; (0, 0) on a fresh run."""
        import ray.train

        registered = ray.train.get_checkpoint()
        directory, step = None, 0
        if registered is not None:
            directory = Path(registered.path)
            step = json.loads((directory / STATE_FILE).read_text())["step"]
        newer = self._on_rank0(lambda: newest_complete(checkpoints_dir(self.config), step))
        if newer is not None:
            directory, self.resumed_unregistered = newer[0], True
        if directory is None:
            return 0, 0
        load_checkpoint_model(unwrap(self.model), directory)
        self.optimizer.load_state_dict(load_tensors(directory / "optimizer.pt"))
        self.scheduler.load_state_dict(load_tensors(directory / "scheduler.pt"))
        state = json.loads((directory / STATE_FILE).read_text())
        if self.rank0:
            unregistered = " (complete, not yet registered by Ray Train)" if newer else ""
            self.log.note(f"resumed from checkpoint {directory}{unregistered} at step {state['step']}")
        return state["step"], state["data_position"]

    def _on_rank0(self, decide):
        """`decide()` run on rank 0, its result given to every rank (so all resume alike)."""
        import torch.distributed as dist

        choice = [decide() if self.rank0 else None]
        if dist.is_initialized() and self.world > 1:
            dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def _forget_unregistered(self) -> None:
        """After resuming from a checkpoint Ray Train never registered, delete it once the
        run ends, so only Ray's top-K checkpoints stay on disk."""
        import ray.train

        if not self.resumed_unregistered:
            return
        tracked = {str(Path(r.checkpoint.path).resolve()) for r in ray.train.get_all_reported_checkpoints()}
        for path in remove_unregistered(checkpoints_dir(self.config), tracked):
            self.log.note(f"removed {path}: resumed from, but never registered by Ray Train")


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


def read_losses(pending: list[dict], sum_over_ranks=lambda t: t) -> None:
    """Turn each pending step's `train_loss` (this rank's share, a device tensor) into the
    step's mean loss over all ranks, as a float: one all-reduce and one host transfer (the
    loop's only GPU sync between reads); stop at the first non-finite loss, naming its step."""
    values = sum_over_ranks(torch.stack([metrics["train_loss"] for metrics in pending])).tolist()
    for metrics, value in zip(pending, values):
        _check_finite("loss", value, metrics["step"])
        metrics["train_loss"] = value


def _check_finite(name: str, value: float, step: int) -> None:
    if not math.isfinite(value):
        raise RaymedError(f"{name} is {value} at step {step}: stopping; the last good checkpoint is kept")


def endless_epochs(make_epoch):
    """make_epoch()'s items, one epoch after another, forever."""
    while True:
        yield from make_epoch()
