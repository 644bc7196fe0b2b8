"""The training loop each Ray Train worker runs: DDP or FSDP steps with a token-weighted
loss, validation over every block, checkpoints reported to Ray Train, and resume."""

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
    file_entries,
    load_checkpoint_model,
    load_tensors,
    mark_complete,
    newest_complete,
    remove_unregistered,
    write_checkpoint,
    write_training_state,
)
from raymed.train.fsdp import (
    SHARDED_DIR,
    gather_full_state,
    load_sharded_state,
    save_consolidated,
    save_sharded_state,
    shard_model,
)
from raymed.train.metrics import labelled_tokens
from raymed.train.model import (
    apply_scope,
    build_model,
    enable_activation_checkpointing,
    flops_per_token,
    load_tokenizer,
    unwrap,
)
from raymed.train.runlog import RunLog
from raymed.train.paths import checkpoints_dir, train_dir
from raymed.train.validation import in_lockstep, unscored_batch, validate


def train_loop_per_worker(config_data: dict) -> None:
    """One worker's loop (runs inside Ray Train)."""
    WorkerLoop(Config.model_validate(config_data)).run()


class WorkerLoop:
    """One DDP or FSDP worker: its model, optimizer, schedule, data stream and throughput
    clocks. Rank 0 also keeps the run log and the progress bar."""

    def __init__(self, config: Config):
        import ray.train
        import ray.train.torch
        from transformers import get_scheduler

        self.config, train = config, config.train
        torch.manual_seed(config.seed)
        if train.use_gpu:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        context = ray.train.get_context()
        self.rank0, self.world = context.get_world_rank() == 0, context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.fsdp = train.strategy == "fsdp"
        self.tokenizer = load_tokenizer(config.model)
        new_rows = task_token_ids(self.tokenizer, config.model.add_tokens)
        self.model = self._distribute(apply_scope(build_model(config.model, self.tokenizer), train, new_rows))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(optimizer_groups(self.params, train.weight_decay), lr=train.lr,
                                           fused=train.use_gpu)  # after sharding: over the shards
        self.forward = torch.compile(self.model) if train.compile and not self.fsdp else self.model
        self.autocast = partial(torch.autocast, self.device.type, dtype=torch.bfloat16, enabled=train.bf16)
        self.scheduler = get_scheduler(train.lr_schedule, self.optimizer,
                                       train.effective_warmup_steps, train.max_steps)
        self.log = RunLog(train_dir(config) / "logs") if self.rank0 else None
        self.resumed_unregistered = False
        self.step, self.position = self._resume()
        self.start_step = self.step
        self.flops_per_token = flops_per_token(unwrap(self.model), config.data.block_size)
        self._restart_clocks()

    def _distribute(self, model):
        """The model wrapped for DDP (Ray's `prepare_model`) or sharded by FSDP2 (each block
        compiled first when `train.compile`), activation checkpointing applied before either."""
        from ray.train.torch import prepare_model

        if self.config.train.activation_checkpointing:
            enable_activation_checkpointing(model)
        if self.fsdp:
            return shard_model(model, self.config.train, self.device, self.world)
        return prepare_model(model)

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
        pending: list[dict] = []  # the steps not logged yet, their losses still device tensors
        while self.step < train.max_steps:
            lr = self.scheduler.get_last_lr()[0]  # the rate this step trains at
            losses = self._train_step(stream)
            pending.append({"step": self.step, **losses, "lr": lr})
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

    def _train_step(self, stream) -> dict[str, torch.Tensor]:
        """One optimizer step over `grad_accum` micro-batches. Every labelled token weighs
        the same, whichever micro-batch or rank holds it: each micro-batch's summed token
        loss is divided by the step's labelled tokens counted over all ranks. Returns this
        rank's share of the step's mean losses (`train_loss`, and any parts `_losses` adds),
        left on the device (detached) so that the host need not wait for the GPU."""
        batches = [self._next_batch(stream) for _ in range(self.config.train.grad_accum)]
        tokens = torch.stack([labelled_tokens(b["labels"]) for b in batches]).sum()
        tokens = self._sum_over_ranks(tokens.to(self.device, non_blocking=True))
        sums: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(batches):
            with self._gradient_sync(index == len(batches) - 1), self.autocast():
                losses = self._losses(batch, tokens)
            # DDP's all-reduce and FSDP's reduce-scatter both average gradients over ranks;
            # the loss is over all ranks' tokens already.
            (losses["train_loss"] * self.world).backward()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0) + value.detach()
        self._apply_gradients()
        self.step += 1
        return sums

    def _losses(self, batch: dict[str, torch.Tensor], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """A micro-batch's summed token losses over the step's `tokens`: `train_loss`, the one
        trained on (raymed.distill adds its parts)."""
        return {"train_loss": self.forward(**batch, num_items_in_batch=tokens).loss}

    def _apply_gradients(self) -> torch.Tensor:
        """Clip, step the optimizer and the schedule, clear the gradients; returns the
        gradients' norm before clipping (over all ranks' shards under FSDP)."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _next_batch(self, stream) -> dict[str, torch.Tensor]:
        fetch = time.perf_counter()
        batch = next(stream)
        self.tokens += int(batch.pop("real_tokens").sum())
        self.position += 1
        self.waited += time.perf_counter() - fetch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _gradient_sync(self, last_micro_batch: bool):
        """Gradients are reduced over ranks on the step's last micro-batch only: DDP's
        `no_sync` before it; FSDP accumulates unsharded gradients until it is told to sync."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last_micro_batch)
            return contextlib.nullcontext()
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
        batches = validation_batches(self.config.train.micro_batch_size)
        if self.fsdp:  # each forward all-gathers: every rank must run as many
            batches = in_lockstep(batches, unscored_batch(self.config.data.block_size), self._any_rank)
        with self.autocast():
            val = validate(unwrap(self.model), batches, self.device, self._sum_over_ranks)
        _check_finite("validation loss", val["val_loss"], self.step)
        self.validating += time.perf_counter() - started
        return val

    def _any_rank(self, flag: bool) -> bool:
        return bool(self._sum_over_ranks(torch.tensor(int(flag), device=self.device)).item())

    def _report_with_checkpoint(self, metrics: dict) -> None:
        """The step's metrics, reported to Ray Train with a checkpoint: written by rank 0
        under DDP; under FSDP every rank adds its shards, which Ray uploads into the one
        checkpoint directory."""
        import ray.train
        from ray.train import Checkpoint

        started = time.perf_counter()
        state = {"step": self.step, "data_position": self.position, "attempt_started_at_step": self.start_step}
        with tempfile.TemporaryDirectory() as directory:
            if self.fsdp:
                self._write_sharded_checkpoint(Path(directory), state)
            elif self.rank0:
                write_checkpoint(Path(directory), unwrap(self.model), self.tokenizer, self.optimizer,
                                 self.scheduler, state)
            writes = self.fsdp or self.rank0
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory) if writes else None)
        self.validating += time.perf_counter() - started

    def _write_sharded_checkpoint(self, out: Path, state: dict) -> None:
        """This rank's DCP shards; on rank 0 also the consolidated Hugging Face directory,
        the schedule and the trainer state, and last the completion mark, which lists every
        rank's files (their entries gathered here, since each rank writes its own directory)."""
        save_sharded_state(out / SHARDED_DIR, self.model, self.optimizer)
        full_state = gather_full_state(self.model)
        if self.rank0:
            save_consolidated(out, self.model, full_state, self.tokenizer, self.config.train)
            write_training_state(out, self.scheduler, state)
        del full_state
        entries = self._gather(file_entries(out))
        if self.rank0:
            mark_complete(out, state["step"], {name: e for rank in entries[1:] for name, e in rank.items()})

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
        self._check_written_by_this_strategy(directory)
        if self.fsdp:
            load_sharded_state(self.model, self.optimizer, directory)
        else:
            load_checkpoint_model(unwrap(self.model), directory)
            self.optimizer.load_state_dict(load_tensors(directory / "optimizer.pt"))
        self.scheduler.load_state_dict(load_tensors(directory / "scheduler.pt"))
        state = json.loads((directory / STATE_FILE).read_text())
        if self.rank0:
            unregistered = " (complete, not yet registered by Ray Train)" if newer else ""
            self.log.note(f"resumed from checkpoint {directory}{unregistered} at step {state['step']}")
        return state["step"], state["data_position"]

    def _check_written_by_this_strategy(self, directory: Path) -> None:
        """A DDP checkpoint has no shards and an FSDP one no optimizer.pt: resume as written."""
        written_under = "fsdp" if (directory / SHARDED_DIR).is_dir() else "ddp"
        if written_under != self.config.train.strategy:
            raise RaymedError(f"checkpoint {directory} was written under train.strategy: {written_under}, this "
                              f"run is {self.config.train.strategy}: resume with {written_under}, or start a new run "
                              "(another run_name)")

    def _on_rank0(self, decide):
        """`decide()` run on rank 0, its result given to every rank (so all resume alike)."""
        import torch.distributed as dist

        choice = [decide() if self.rank0 else None]
        if dist.is_initialized() and self.world > 1:
            dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def _gather(self, value) -> list:
        """`value` from every rank, in rank order (the same list on each)."""
        import torch.distributed as dist

        if not (dist.is_initialized() and self.world > 1):
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def _forget_unregistered(self) -> None:
        """After resuming from a checkpoint Ray Train never registered, delete it once the
        run ends, so only Ray's top-K checkpoints stay on disk."""
        import ray.train

        if not self.resumed_unregistered:
            return
        tracked = {str(Path(r.checkpoint.path).resolve()) for r in ray.train.get_all_reported_checkpoints()}
        for path in remove_unregistered(checkpoints_dir(self.config), tracked):
            self.log.note(f"removed {path}: resumed from, but never registered by Ray Train")


def read_losses(pending: list[dict], sum_over_ranks=lambda t: t) -> None:
    """Turn each pending step's losses (`train_loss` and any parts beside it: this rank's
    share, device tensors) into the step's means over all ranks, as floats: one all-reduce
    and one host transfer (the loop's only GPU sync between reads); stop at the first
    non-finite loss, naming its step."""
    names = [name for name, value in pending[0].items() if isinstance(value, torch.Tensor)]
    values = sum_over_ranks(torch.stack([torch.stack([m[n] for n in names]) for m in pending])).tolist()
    for metrics, row in zip(pending, values):
        for name, value in zip(names, row):
            _check_finite("loss" if name == "train_loss" else name, value, metrics["step"])
            metrics[name] = value


def _check_finite(name: str, value: float, step: int) -> None:
    if not math.isfinite(value):
        raise RaymedError(f"{name} is {value} at step {step}: stopping; the last good checkpoint is kept")


def endless_epochs(make_epoch):
    """make_epoch()'s items, one epoch after another, forever."""
    while True:
        yield from make_epoch()
