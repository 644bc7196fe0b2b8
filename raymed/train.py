"""Ray Train fine-tuning: a TorchTrainer whose workers run one DDP training loop.

Checkpoints are Hugging Face directories (`from_pretrained` loads them as they are,
tokenizer included) plus `optimizer.pt` / `scheduler.pt` (tensors only, loaded with
`weights_only=True`) and `trainer_state.json` (step, data position, and the step the
writing attempt started from). A restarted worker
group, or a rerun with the same run name, resumes from the latest checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from functools import partial
from itertools import islice
from pathlib import Path

import torch
from tqdm import tqdm

from raymed.assets import resolve_pretrained
from raymed.config import Config, ModelConfig, TrainConfig
from raymed.data.records import IGNORE_INDEX
from raymed.errors import RaymedError, last_line

STATE_FILE = "trainer_state.json"
ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "train.log"


def train_dir(config: Config) -> Path:
    """Where Ray Train writes this run (checkpoints under <run_name>/, logs under logs/);
    a sweep's trial writes under the sweep's tune/ directory instead."""
    run = Path(config.storage_path).expanduser() / "runs" / config.run_name
    return run / "tune" / "trials" / config.trial_name if config.trial_name else run / "train"


class RunLog:
    """Rank 0's record of every step (TensorBoard event files and a metrics.jsonl line) and
    of events such as a resume (printed and appended to train.log)."""

    def __init__(self, directory: Path):
        from tensorboardX import SummaryWriter

        directory.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(directory))
        self.lines = (directory / METRICS_FILE).open("a")
        self.events = directory / EVENTS_FILE

    def note(self, message: str) -> None:
        print(message, flush=True)
        with self.events.open("a") as events:
            events.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")

    def log(self, metrics: dict) -> None:
        for name, value in metrics.items():
            if name != "step":
                self.writer.add_scalar(name, value, metrics["step"])
        self.lines.write(json.dumps(metrics) + "\n")
        self.lines.flush()

    def close(self) -> None:
        self.writer.close()
        self.lines.close()


def build_model(model_config: ModelConfig, tokenizer):
    """The causal LM to train: pretrained weights, or a fresh model of `architecture`."""
    from transformers import AutoModelForCausalLM

    attn = model_config.attn_implementation
    if model_config.init == "scratch":
        return AutoModelForCausalLM.from_config(_scratch_config(model_config, tokenizer), attn_implementation=attn)
    path = resolve_pretrained(model_config.name)
    try:
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32,
                                                    use_safetensors=True)
    except (OSError, ValueError) as err:
        raise RaymedError(f"{model_config.name} is not a causal LM that transformers can load: {err}") from None


def load_tokenizer(model_config: ModelConfig):
    """The tokenizer the model trains with (its own unless `model.tokenizer` names another)."""
    from transformers import AutoTokenizer

    name = model_config.tokenizer or model_config.name
    try:
        return AutoTokenizer.from_pretrained(resolve_pretrained(name))
    except (OSError, ValueError) as err:
        raise RaymedError(f"{name} is not a tokenizer transformers can load: {err}") from None


def _scratch_config(model_config: ModelConfig, tokenizer):
    """The architecture's config, its vocabulary padded to a multiple of 64 (faster matmuls)."""
    from transformers import AutoConfig

    arch = dict(model_config.architecture)
    vocab = -(-len(tokenizer) // 64) * 64
    return AutoConfig.for_model(arch.pop("model_type"), vocab_size=vocab, **arch)


def check_model_fits(config: Config) -> None:
    """Fail before any worker starts: the tokenizer's ids must index the model's embedding,
    and a block must fit the model's context."""
    from transformers import AutoConfig

    tokenizer = load_tokenizer(config.model)
    if config.model.init == "scratch":
        model_config = _scratch_config(config.model, tokenizer)
    else:
        try:
            model_config = AutoConfig.from_pretrained(resolve_pretrained(config.model.name))
        except (OSError, ValueError) as err:
            raise RaymedError(f"{config.model.name} is not a model transformers can load: {err}") from None
    rows = model_config.get_text_config().vocab_size
    if len(tokenizer) > rows:
        raise RaymedError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows: "
            "use the model's own tokenizer (model.tokenizer) or a model built for this one"
        )
    text_config = model_config.get_text_config()
    context = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if context and config.data.block_size > context:
        raise RaymedError(f"data.block_size {config.data.block_size} exceeds the model's context of {context} tokens")


def apply_scope(model, train: TrainConfig):
    """The model with only what `train.scope` trains left trainable: everything (`full`),
    the last N blocks and the head (`top_layers`), or LoRA adapters on every linear layer
    (`lora`, returned wrapped by peft)."""
    if train.scope == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        return get_peft_model(model, lora)
    if train.scope == "top_layers":
        _train_top_layers(model, train.top_layers)
    return model


def _train_top_layers(model, top_layers: int) -> None:
    layers = model.base_model.layers if hasattr(model.base_model, "layers") else model.base_model.h
    if top_layers > len(layers):
        raise RaymedError(f"train.top_layers is {top_layers} but the model has {len(layers)} layers")
    for param in model.parameters():
        param.requires_grad = False
    for module in [*layers[-top_layers:], model.get_output_embeddings()]:
        for param in module.parameters():
            param.requires_grad = True


def save_checkpoint_model(model, tokenizer, out: Path) -> None:
    """A directory `from_pretrained` loads as it is; for LoRA the merged weights, with the
    adapter alone beside them in `adapter/`."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.save_pretrained(out / ADAPTER_DIR)
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_checkpoint_model(model, directory: Path) -> None:
    """Load a checkpoint's weights (safetensors only) into the model being trained."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    lora = isinstance(model, PeftModel)
    path = directory / ADAPTER_DIR / "adapter_model.safetensors" if lora else directory / "model.safetensors"
    try:
        if lora:
            set_peft_model_state_dict(model, load_file(path))
        else:
            load_model(model, path, strict=False)
    except (OSError, SafetensorError) as err:
        raise RaymedError(f"checkpoint file {path} is unreadable ({err}): "
                          "delete that checkpoint to resume from the one before") from None


def token_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """Summed next-token loss, correct predictions, and counted tokens (labels != -100)."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    mask = targets != IGNORE_INDEX
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    correct = ((logits.argmax(-1) == targets) & mask).sum()
    return loss.item(), int(correct), int(mask.sum())


def validate(model, batches, device="cpu") -> dict[str, float]:
    """val_loss, val_ppl and val_token_acc over `batches`, summed across all workers."""
    import torch.distributed as dist

    totals = torch.zeros(3, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            totals += torch.tensor(token_metrics(logits, batch["labels"]), dtype=torch.float64)
    model.train()
    if dist.is_initialized():
        totals = totals.to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    loss_sum, correct, count = totals.tolist()
    if count == 0:
        raise RaymedError("the validation split has no tokens to score: give more data or a validation_path")
    val_loss = loss_sum / count
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)), "val_token_acc": correct / count}


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
        self.model = prepare_model(apply_scope(build_model(config.model, self.tokenizer), train))
        self.device = ray.train.torch.get_device()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=train.lr, weight_decay=train.weight_decay,
                                           fused=train.use_gpu)
        self.forward = torch.compile(self.model) if train.compile else self.model
        self.autocast = partial(torch.autocast, self.device.type, dtype=torch.bfloat16, enabled=train.bf16)
        self.scheduler = get_scheduler(train.lr_schedule, self.optimizer,
                                       train.effective_warmup_steps, train.max_steps)
        self.rank0 = ray.train.get_context().get_world_rank() == 0
        self.log = RunLog(train_dir(config) / "logs") if self.rank0 else None
        self.step, self.position = self._resume()
        self.start_step = self.step
        self.flops_per_token = flops_per_token(_unwrap(self.model), config.data.block_size)
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
        stream = prefetched(islice(endless_epochs(lambda: self._batches("train")), self.position, None),
                            pin_memory=self.device.type == "cuda")
        progress = tqdm(total=train.max_steps, initial=self.step, desc="train", disable=not self.rank0)
        self._restart_clocks()
        pending: list[dict] = []  # the steps not logged yet, their train_loss still a device tensor
        while self.step < train.max_steps:
            loss = self._train_step(stream)
            pending.append({"step": self.step, "train_loss": loss, "lr": self.scheduler.get_last_lr()[0]})
            checkpoint = self.step % train.eval_every == 0 or self.step == train.max_steps
            first = self.step == self.start_step + 1
            read = checkpoint or first or self.step % train.log_every == 0
            if read:
                read_losses(pending)  # a non-finite loss stops the run here, before any checkpoint
            # Timed after that sync, so a read step's speed counts all the GPU work queued so far.
            pending[-1] = self._throughput() | pending[-1]
            if checkpoint:
                pending[-1] |= self._validate_and_checkpoint(pending[-1])
            if first and self.step < train.max_steps:
                self._restart_clocks()  # speed is steady-state: the first step compiles and warms caches
            if self.rank0:
                progress.update(1)
                if read:
                    for metrics in pending:
                        self.log.log(metrics)
                    progress.set_postfix(loss=f"{pending[-1]['train_loss']:.3f}")
            if read:
                pending = []
        progress.close()
        if self.rank0:
            self.log.close()

    def _batches(self, split: str):
        from raymed.data.handoff import worker_batches

        return worker_batches(split, self.config.train.micro_batch_size,
                              deterministic=self.config.data.deterministic)

    def _train_step(self, stream) -> torch.Tensor:
        """One optimizer step over `grad_accum` micro-batches; its mean loss, left on the
        device (detached) so that the host need not wait for the GPU."""
        train = self.config.train
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(train.grad_accum):
            fetch = time.perf_counter()
            batch = next(stream)
            self.tokens += int(batch.pop("real_tokens").sum())
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            self.waited += time.perf_counter() - fetch
            self.position += 1
            with self.autocast():
                loss = self.forward(**batch).loss / train.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.params, train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_sum

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

    def _validate_and_checkpoint(self, metrics: dict) -> dict[str, float]:
        """Validation metrics, reported to Ray Train with a checkpoint (written by rank 0)."""
        started = time.perf_counter()
        with self.autocast():
            val = validate(self.model, self._batches("validation"), self.device)
        _check_finite("validation loss", val["val_loss"], self.step)
        state = {"step": self.step, "data_position": self.position, "attempt_started_at_step": self.start_step}
        self._report_with_checkpoint(metrics | val, state)
        self.validating += time.perf_counter() - started
        return val

    def _report_with_checkpoint(self, metrics: dict, state: dict) -> None:
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if self.rank0:
                out = Path(directory)
                save_checkpoint_model(_unwrap(self.model), self.tokenizer, out)
                torch.save(self.optimizer.state_dict(), out / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), out / "scheduler.pt")
                (out / STATE_FILE).write_text(json.dumps(state))
                checkpoint = Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint)

    def _resume(self) -> tuple[int, int]:
        """(step, data position) from the latest registered checkpoint, after loading its
        state; (0, 0) on a fresh run."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0, 0
        with checkpoint.as_directory() as directory:
            directory = Path(directory)
            load_checkpoint_model(_unwrap(self.model), directory)
            self.optimizer.load_state_dict(_load_tensors(directory / "optimizer.pt"))
            self.scheduler.load_state_dict(_load_tensors(directory / "scheduler.pt"))
            state = json.loads((directory / STATE_FILE).read_text())
        if self.rank0:
            self.log.note(f"resumed from checkpoint {checkpoint.path} at step {state['step']}")
        return state["step"], state["data_position"]


def read_losses(pending: list[dict]) -> None:
    """Turn each pending step's `train_loss` from a device tensor into a float, all in one
    host transfer (the loop's only GPU sync between reads); stop at the first non-finite
    loss, naming its step."""
    values = torch.stack([metrics["train_loss"] for metrics in pending]).tolist()
    for metrics, value in zip(pending, values):
        _check_finite("loss", value, metrics["step"])
        metrics["train_loss"] = value


def _check_finite(name: str, value: float, step: int) -> None:
    if not math.isfinite(value):
        raise RaymedError(f"{name} is {value} at step {step}: stopping; the last good checkpoint is kept")


def _load_tensors(path: Path):
    """A checkpoint's optimizer or scheduler state: tensors and plain containers only."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # torch raises several kinds for a damaged file
        raise RaymedError(f"checkpoint file {path} is unreadable ({err}): delete that checkpoint to resume from the one before") from None


def flops_per_token(model, block_size: int) -> float:
    """Training FLOPs per token by the nanoGPT/PaLM formula: 6N + 12·L·H·Q·T."""
    config = model.config.get_text_config()
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = config.hidden_size // heads
    params = sum(p.numel() for p in model.parameters())
    return 6 * params + 12 * layers * heads * head_dim * block_size


def endless_epochs(make_epoch):
    """make_epoch()'s items, one epoch after another, forever."""
    while True:
        yield from make_epoch()


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _worker_resources(train: TrainConfig) -> dict[str, float]:
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = train.gpus_per_worker
    return resources


def fit(config: Config, datasets: dict, loop=train_loop_per_worker, callbacks=()):
    """Run the TorchTrainer for `config` on the data stage's `datasets`; the Ray Result.
    `loop` is the per-worker function (tests wrap it to inject faults); `callbacks` are
    Ray Train callbacks (a sweep passes Tune's report callback). Worker failures
    beyond `train.max_failures` raise RaymedError naming the cause."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer

    from raymed.data.handoff import train_data_config

    train = config.train
    check_model_fits(config)
    trainer = TorchTrainer(
        loop,
        train_loop_config=config.model_dump(),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=_worker_resources(train)),
        datasets=datasets,
        dataset_config=train_data_config(config.data.deterministic),
        run_config=RunConfig(
            name=config.trial_name or config.run_name,
            storage_path=str(train_dir(config)),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints,
                                               checkpoint_score_attribute=config.tune.metric,
                                               checkpoint_score_order=config.tune.mode),
            failure_config=FailureConfig(max_failures=train.max_failures),
            callbacks=list(callbacks),
        ),
    )
    try:
        return trainer.fit()
    except WorkerGroupError as err:
        causes = "; ".join(f"rank {rank}: {last_line(error)}" for rank, error in sorted(err.worker_failures.items()))
        raise RaymedError(f"training failed after {train.max_failures} retries ({causes}); "
                          f"checkpoints and logs: {train_dir(config)}") from err

