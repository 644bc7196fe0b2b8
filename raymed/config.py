"""One typed config for every stage: loaded from YAML, overridden with `--set a.b=value`.

The same `Config` object is built by the CLI, the job entrypoints and the Serve config,
and passed as plain data (`model_dump()`) to Ray workers, which rebuild it with
`Config.model_validate`. Bad values fail here, before any cluster resource is reserved,
with an error naming the field and the value given.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from raymed.config_section import Section as _Section
from raymed.distill.config import DistillConfig
from raymed.errors import RaymedError
from raymed.serve_config import ServeConfig
from raymed.tokenizer.config import TaskToken, check_task_tokens
from raymed.train_config import TrainConfig

PRESETS = resources.files("raymed.presets")
"""The YAML presets, shipped inside the package (a wheel or `pip install .` has them)."""
USER_CONFIGS = Path("configs")
"""A user's own YAML files, found by name too when run from the directory holding configs/."""


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
    add_tokens: list[TaskToken] = Field(default_factory=list)
    """Task tokens added to the tokenizer (`<dx>`, or `{content: <dx>, special: true}`); the
    embedding grows to fit them (docs/tokenizer.md)."""

    _distinct_tokens = field_validator("add_tokens")(check_task_tokens)

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
    max_validation_records: int | None = Field(None, ge=1)
    """Read only the first N records of the validation file (needs one: `validation_path`,
    or a cached corpus, which has one); every validation pass gets that much cheaper."""


Distribution = Literal["loguniform", "uniform", "randint", "choice", "grid"]
TUNE_METRICS = {"val_loss": "min", "val_ppl": "min", "val_token_acc": "max"}


class TuneConfig(_Section):
    """A Ray Tune sweep (`raymed tune`): each trial is a Ray Train run of this config with
    the `space` fields sampled."""

    space: dict[str, dict[Distribution, list[Any]]] = Field(default_factory=lambda: {
        "train.lr": {"loguniform": [1e-4, 3e-3]},
        "train.warmup_steps": {"randint": [0, 4]},
    })
    """Dotted config field → one distribution: loguniform/uniform [low, high], randint
    [low, high), choice [values...], or grid [values...] (every value, each `num_samples`
    times)."""
    metric: Literal["val_loss", "val_ppl", "val_token_acc"] = "val_loss"
    num_samples: int = Field(4, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    search: Literal["random", "optuna"] = "random"
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(4, ge=1)
    """ASHA: training steps every trial runs before it can be stopped."""
    reduction_factor: float = Field(2, gt=1)

    @property
    def mode(self) -> Literal["min", "max"]:
        return TUNE_METRICS[self.metric]

    @field_validator("space", mode="before")
    @classmethod
    def _numbers(cls, space):
        """YAML reads `1e-3` (no dot) as a string; in a distribution it means the number."""
        if isinstance(space, dict):
            return {field: {kind: [_number(a) for a in args] if isinstance(args, list) else args
                            for kind, args in spec.items()} if isinstance(spec, dict) else spec
                    for field, spec in space.items()}
        return space

    @model_validator(mode="after")
    def _valid_space(self) -> TuneConfig:
        if not self.space:
            raise ValueError("the search space is empty: name at least one field, e.g. train.lr")
        for field, spec in self.space.items():
            _check_field_path(field)
            if len(spec) != 1:
                raise ValueError(f"{field}: give exactly one distribution, got {sorted(spec) or 'none'}")
            (kind, args), = spec.items()
            if kind in ("choice", "grid"):
                if not args:
                    raise ValueError(f"{field}: {kind} needs at least one value")
            elif len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or args[0] >= args[1]:
                raise ValueError(f"{field}: {kind} needs [low, high] numbers with low < high, got {args}")
            elif kind == "loguniform" and args[0] <= 0:
                raise ValueError(f"{field}: loguniform needs low > 0, got {args[0]}")
        return self


def _number(value):
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_field_path(path: str) -> None:
    """`train.lr` must name a field of Config (sections walked by their pydantic models)."""
    model: type[BaseModel] = Config
    parts = path.split(".")
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            raise ValueError(f"{path}: no such config field ({part!r})")
        annotation = field.annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if depth < len(parts) - 1:
            if not is_section:
                raise ValueError(f"{path}: {part} is not a section")
            model = annotation
        elif is_section:
            raise ValueError(f"{path}: name a field inside the {part} section")

class EvalConfig(_Section):
    """Evaluation (Ray Data batch inference) and the promotion gate."""

    mcq_path: str = "medical-mcq-v1"
    """Multiple-choice items: an eval set in RAYMED_CACHE/eval, or a jsonl file."""
    max_items: int | None = Field(None, ge=1)
    """Score a seeded sample of this many items (all when unset)."""
    length_norm: bool = True
    """Score options by log-likelihood per character (else the plain sum)."""
    actors: int = Field(1, ge=1)
    """Size of the Ray Data actor pool that runs the model (one model per actor)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: one GPU per actor when the cluster has GPUs, else CPU."""
    cpus_per_actor: float = Field(1, gt=0)
    items_per_batch: int = Field(8, ge=1)
    """Multiple-choice items per inference batch (each item: one forward of its prompt, one of its options)."""
    blocks_per_batch: int = Field(8, ge=1)
    """Validation blocks per inference batch."""
    gate_metric: Literal["val_loss", "mcq_acc"] = "val_loss"
    """What a candidate must beat the current registry version on to be promoted."""
    min_improvement: float = Field(0.0, ge=0)
    """How much better than the current version the gate metric must be (0: any gain)."""
    heldout_split: str = "heldout"
    """The multiple-choice split a candidate must not regress on significantly."""
    heldout_tolerance: float = Field(0.0, ge=0, lt=1)
    """A held-out accuracy drop counts when the CI's upper end is below -tolerance."""
    confidence: float = Field(0.95, gt=0.5, lt=1)
    """Level of the paired-bootstrap confidence interval for accuracy differences."""
    bootstrap_samples: int = Field(2000, ge=100)


class RegistryConfig(_Section):
    """Promoted models under <storage_path>/registry/<name>/."""

    name: str = Field("medical-assistant", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """The registry entry (and the model name served)."""
    lock_timeout_s: float = Field(600, ge=0)
    """How long a promotion waits for another one to finish before failing."""


class IndexConfig(_Section):
    """The knowledge index (`raymed index build`): BM25 over the packaged sources and documents."""

    name: str = Field("medical-v1", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Built into RAYMED_CACHE/index/<name>/."""
    sources: list[Literal["hpo", "icd10cm", "abbreviations", "drugs"]] = ["hpo", "icd10cm", "abbreviations", "drugs"]
    """Packaged sources indexed, every entry of each."""
    documents: str | None = None
    """Also index these user documents (a file or directory in the data stage's formats)."""
    shards: int = Field(2, ge=1, le=64)
    workers: int = Field(1, ge=1)
    """Ray Data concurrency of the read and per-shard build steps."""

    @model_validator(mode="after")
    def _something(self) -> IndexConfig:
        if not self.sources and not self.documents:
            raise ValueError("index.sources is empty and no index.documents: nothing to index")
        return self


class PipelineConfig(_Section):
    """`raymed pipeline` / `jobs/pipeline.py`: which training stage runs, and the question
    asked of the deployed model at the end."""

    tune: bool = False
    """Train with a Ray Tune sweep (the `tune` section) instead of one fine-tune."""
    distill: bool = False
    """After the gate, distill the registry's current version into a student (the `distill`
    section; its own registry model), before deploying."""
    question: str = Field("What are the common symptoms of iron deficiency anemia?", min_length=1)
    """The medical question sent to the served model once it is deployed."""
    max_tokens: int = Field(48, ge=1)
    """The answer's length limit (new tokens)."""


class Config(_Section):
    """Everything a raymed run needs."""

    run_name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    storage_path: str = "~/raymed"
    """Where runs and the registry live: a local/NFS path or a pyarrow filesystem URI."""
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    trial_name: str | None = None
    """Set by `raymed tune` for each trial (its Ray Train run lives under the sweep); leave unset."""


def preset_names() -> list[str]:
    """The YAML presets shipped in the package (raymed/presets/)."""
    return sorted(p.name.removesuffix(".yaml") for p in PRESETS.iterdir() if p.name.endswith(".yaml"))


def load_config(source: str | Path | None = None, overrides: list[str] = (),
                sections: dict | None = None) -> Config:
    """Build a Config from a preset name or YAML path, then `sections` (whole sections from
    another file, e.g. a sweep's `tune`), then `a.b=value` overrides."""
    raw = read_yaml(source) if source else {}
    for name, section in (sections or {}).items():
        raw[name] = {**raw.get(name, {}), **section}
    for override in overrides:
        _apply_override(raw, override)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise RaymedError(f"bad config ({source or 'defaults'}): {_describe(err)}") from None


def with_values(config: Config, values: dict[str, Any]) -> Config:
    """`config` with dotted fields replaced by typed values (a Tune trial's sample)."""
    raw = config.model_dump()
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise RaymedError(f"bad config: {_describe(err)}") from None


def read_yaml(source: str | Path) -> dict:
    """A YAML mapping from a path, or by name from ./configs/<name>.yaml (a user's own) or
    the package's presets."""
    text, where = _yaml_text(source)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise RaymedError(f"config {where} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RaymedError(f"config {where} must be a YAML mapping, got {type(raw).__name__}")
    return raw


def _yaml_text(source: str | Path) -> tuple[str, str]:
    """The YAML text `source` names, and where it was found."""
    path = Path(source)
    if not path.suffix and not path.exists():
        path = USER_CONFIGS / f"{source}.yaml"
        preset = PRESETS / f"{source}.yaml"
        if not path.is_file() and preset.is_file():
            return preset.read_text(), f"preset {source}"
    if not path.is_file():
        raise RaymedError(
            f"config {source!r} not found: give a YAML path or a preset ({', '.join(preset_names())})"
        )
    return path.read_text(), str(path)


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
