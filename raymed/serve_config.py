"""The `serve` section of the config: the OpenAI-compatible Serve app, its replicas and
engine, and the Retriever (its own module; `from raymed.config import ServeConfig` works too)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from raymed.config_section import Section


class RetrieverConfig(Section):
    """The Retriever deployment (knowledge index search), scaled apart from the model replicas."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(300, ge=0)
    num_cpus: float = Field(0.25, ge=0)


class ServeConfig(Section):
    """Ray Serve: the OpenAI-compatible HTTP API in front of autoscaled model replicas."""

    host: str = "127.0.0.1"
    """Where Serve's HTTP proxy listens (0.0.0.0 to accept other machines)."""
    port: int = Field(8000, ge=1, le=65535)
    model: str = "current"
    """`current`: the model registry's current version (pinned at deploy time; the base
    model is registered as v1 on first use); or a model in RAYMED_CACHE/models, or a local
    Hugging Face model directory."""
    model_name: str | None = None
    """The name clients put in `model` (and `/v1/models` lists); default: the directory's name."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' dtype on the replicas; `auto`: bfloat16 on a GPU and on a CPU with native
    bfloat16 arithmetic (AVX512-BF16 or AMX), float32 on other CPUs."""
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    """The autoscaler adds replicas when each has more than this many requests in flight."""
    upscale_delay_s: float = Field(30, ge=0)
    """How long load must stay above target before the autoscaler adds a replica."""
    downscale_delay_s: float = Field(600, ge=0)
    """How long load must stay below target before the autoscaler removes a replica."""
    autoscale_look_back_s: float = Field(30, gt=10)
    """The window the autoscaler averages requests in flight over; longer than the 10 s at
    which Ray Serve's replicas report their load (Ray warns at a shorter one and says a future
    release will refuse it)."""
    rolling_surge_percent: int = Field(100, ge=0, le=100)
    """On a redeploy, extra replicas (percent of the target) started before old ones drain, so
    requests in flight finish and new ones always find a replica. Needs room for them on the
    cluster (a GPU each on GPUs); 0: Serve stops old replicas first and requests wait meanwhile."""
    gateway_replicas: int = Field(1, ge=1)
    """Replicas of the Gateway, the HTTP ingress that validates, templates, tokenizes and
    frames every request's stream; Serve's proxy spreads requests over them."""
    max_ongoing_requests: int = Field(16, ge=1)
    """Requests one replica takes at once (running plus waiting to join its batch)."""
    max_queued_requests: int = Field(64, ge=-1)
    """Requests waiting for a replica beyond that; more are refused (`-1`: no limit). Serve
    counts them at each caller, so each Gateway replica holds up to this many."""
    overload_status: Literal[503, 429] = 503
    """The HTTP status of a refused request (it carries `Retry-After`)."""
    retry_after_s: int = Field(1, ge=0)
    max_batch_size: int = Field(16, ge=1)
    """Sequences decoded together on one replica; newcomers join between decode steps."""
    max_num_batched_tokens: int = Field(512, ge=2)
    """Tokens one engine step processes (a decode token per running sequence, then prompt
    tokens); a longer prompt is prefilled in chunks across steps. More than max_batch_size."""
    long_prefill_token_threshold: int | None = Field(None, ge=1)
    """A prompt with more tokens than this is prefilled in chunks of at most this many, one
    chunk per step, while the running sequences decode and short prompts go first. Unset:
    max_num_batched_tokens on a GPU, 128 on a CPU (where a step's time grows with its tokens)."""
    cuda_graphs: bool = True
    """On a GPU replica, replay each decode step as a CUDA graph (one per batch-size bucket,
    captured on first use) instead of launching its kernels one by one from Python."""
    default_max_tokens: int = Field(256, ge=1)
    """`max_tokens` when a request gives none (capped by the model's context)."""
    default_temperature: float = Field(1.0, ge=0, le=2)
    """`temperature` when neither the request nor the model's generation_config.json gives one."""
    default_top_p: float = Field(1.0, gt=0, le=1)
    """`top_p` when neither the request nor the model's generation_config.json gives one."""
    default_repetition_penalty: float = Field(1.0, gt=0, le=10)
    """`repetition_penalty` when neither the request nor the model's generation_config.json gives one."""
    max_n: int = Field(4, ge=1)
    """The most choices (`n`) one prompt may ask for."""
    max_choices: int = Field(32, ge=1)
    """The most choices one request may ask for in all (prompts x n; batched completions)."""
    request_timeout_s: float = Field(120, gt=0)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    num_cpus: float = Field(1, gt=0)
    """CPUs per model replica (also its torch thread count)."""
    num_gpus: float = Field(0, ge=0)
    api_key: SecretStr | None = None
    """When set (or RAYMED_API_KEY is), every API route needs `Authorization: Bearer <key>`."""
    grounding: bool | None = None
    """Ground chat answers in the knowledge index (`index.name`) and cite it; unset: on when
    serving the default model (`current` or `smollm2-135m-instruct`), off for other models.
    A request may turn it off with `"grounding": false`."""
    grounding_k: int = Field(3, ge=1, le=50)
    """Passages retrieved into the system prompt of a grounded answer."""
    retriever: RetrieverConfig = Field(default_factory=RetrieverConfig)

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.max_num_batched_tokens <= self.max_batch_size:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be more than "
                             f"max_batch_size ({self.max_batch_size})")
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (no limit) or at least 1")
        return self
