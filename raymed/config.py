"""One typed config for every stage: loaded from YAML, overridden with `--set a.b=value`.

The same `Config` object is built by the CLI, the job entrypoints and the Serve config,
and passed as plain data (`model_dump()`) to Ray workers, which rebuild it with
`Config.model_validate`. Bad values fail here, before any cluster resource is reserved,
with an error naming the field and the value given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from raymed.errors import RaymedError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which causal LM to start from."""

    name: str = "smollm2-135m-instruct"
    """A model in RAYMED_CACHE/models, a local Hugging Face directory, or a hub id."""
    init: Literal["pretrained", "scratch"] = "pretrained"
    """`pretrained` loads `name`'s weights; `scratch` builds `architecture` with random weights."""
    architecture: dict[str, Any] = Field(default_factory=dict)
    """For `init: scratch`: Hugging Face config fields, `model_type` included."""
    tokenizer: str | None = None
    """A tokenizer in RAYMED_CACHE/tokenizers, a directory or a hub id; default: the model's."""
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"

    @model_validator(mode="after")
    def _scratch_needs_architecture(self) -> ModelConfig:
        if self.init == "scratch":
            if "model_type" not in self.architecture:
                raise ValueError("init: scratch needs architecture.model_type (e.g. gpt2, llama)")
            if self.tokenizer is None:
                raise ValueError("init: scratch needs a tokenizer (e.g. gpt2)")
        elif self.architecture:
            raise ValueError("architecture is only used with init: scratch")
        return self


class DataConfig(_Section):
    """Where the corpus comes from and how it becomes token blocks."""

    train_path: str = "medical-v1"
    """A corpus in RAYMED_CACHE/corpus, or a file, directory or URI."""
    validation_path: str | None = None
    """Separate validation data; when unset, `val_fraction` of train is held out."""
    val_fraction: float = Field(0.05, gt=0, lt=1)
    shape: Literal["auto", "text", "instruction", "qa", "messages"] = "auto"
    block_size: int = Field(512, ge=16)
    on_bad_row: Literal["skip", "fail"] = "skip"
    tokenizer_actors: int = Field(1, ge=1)
    """Size of the Ray Data actor pool that tokenizes (one tokenizer per actor)."""
    deterministic: bool = False
    """Same seed → same batches on the same rank in the same order (for resume and tests)."""


class TrainConfig(_Section):
    """Ray Train fine-tuning."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    lr: float = Field(5e-5, gt=0, lt=1)
    warmup_steps: int = Field(10, ge=0)
    lr_schedule: Literal["linear", "cosine"] = "linear"
    max_steps: int = Field(100, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scope: Literal["full", "top_layers", "lora"] = "full"
    top_layers: int | None = Field(None, ge=1)
    """With `scope: top_layers`: how many of the last transformer layers train."""
    lora_r: int = Field(8, ge=1)
    """With `scope: lora`: the adapters' rank."""
    lora_alpha: float = Field(16, gt=0)
    bf16: bool = False
    compile: bool = False
    eval_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0)
    peak_tflops: float = Field(989, gt=0)
    """The accelerator's dense bf16 peak, for MFU (989: an H100 SXM)."""

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if (self.scope == "top_layers") != (self.top_layers is not None):
            raise ValueError("scope: top_layers and train.top_layers go together")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be < max_steps ({self.max_steps})"
            )
        if (self.bf16 or self.compile) and not self.use_gpu:
            raise ValueError("bf16 and compile need use_gpu: true")
        return self


class ServeConfig(_Section):
    """Ray Serve: the OpenAI-compatible HTTP API in front of autoscaled model replicas."""

    host: str = "127.0.0.1"
    """Where Serve's HTTP proxy listens (0.0.0.0 to accept other machines)."""
    port: int = Field(8000, ge=1, le=65535)
    model: str = "smollm2-135m-instruct"
    """A model in RAYMED_CACHE/models or a local Hugging Face model directory."""
    model_name: str | None = None
    """The name clients put in `model` (and `/v1/models` lists); default: the directory's name."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' dtype on the replicas; `auto`: bfloat16 on a GPU, float32 on CPU."""
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    """The autoscaler adds replicas when each has more than this many requests in flight."""
    max_ongoing_requests: int = Field(16, ge=1)
    """Requests one replica takes at once (running plus waiting to join its batch)."""
    max_queued_requests: int = Field(64, ge=-1)
    """Requests waiting for a replica beyond that; more are refused (`-1`: no limit)."""
    overload_status: Literal[503, 429] = 503
    """The HTTP status of a refused request (it carries `Retry-After`)."""
    retry_after_s: int = Field(1, ge=0)
    max_batch_size: int = Field(16, ge=1)
    """Sequences decoded together on one replica; newcomers join between decode steps."""
    default_max_tokens: int = Field(256, ge=1)
    """`max_tokens` when a request gives none (capped by the model's context)."""
    request_timeout_s: float = Field(120, gt=0)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    num_cpus: float = Field(1, gt=0)
    """CPUs per model replica (also its torch thread count)."""
    num_gpus: float = Field(0, ge=0)
    api_key: SecretStr | None = None
    """When set (or RAYMED_API_KEY is), every API route needs `Authorization: Bearer <key>`."""

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (no limit) or at least 1")
        return self


class Config(_Section):
    """Everything a raymed run needs."""

    run_name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    storage_path: str = "~/raymed"
    """Where runs and the registry live: a local/NFS path or a pyarrow filesystem URI."""
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)


def preset_names() -> list[str]:
    """The YAML presets shipped in configs/."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(source: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Build a Config from a preset name or YAML path, then `a.b=value` overrides."""
    raw = _read_yaml(source) if source else {}
    for override in overrides:
        _apply_override(raw, override)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise RaymedError(f"bad config ({source or 'defaults'}): {_describe(err)}") from None


def _read_yaml(source: str | Path) -> dict:
    path = Path(source)
    if not path.suffix and not path.exists():
        path = PRESETS_DIR / f"{source}.yaml"
    if not path.is_file():
        raise RaymedError(
            f"config {source!r} not found: give a YAML path or a preset ({', '.join(preset_names())})"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RaymedError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RaymedError(f"config {path} must be a YAML mapping, got {type(raw).__name__}")
    return raw


def _apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, bools, lists)."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise RaymedError(f"override {override!r} must look like section.field=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RaymedError(f"override {override!r}: {part} is not a section")
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError:
        node[leaf] = value


def _describe(err: ValidationError) -> str:
    """One line per problem: `train.lr: Input should be greater than 0 (got -1)`."""
    parts = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "config"
        if problem["type"] == "value_error":  # a cross-field check: its message says it all
            parts.append(f"{where}: {problem['msg'].removeprefix('Value error, ')}")
            continue
        message = "unknown field" if problem["type"] == "extra_forbidden" else problem["msg"]
        parts.append(f"{where}: {message} (got {problem['input']!r})")
    return "; ".join(parts)


def dump_yaml(config: Config) -> str:
    """The config as YAML; secrets (serve.api_key) print masked."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
