"""The Serve application: the Gateway (raymed.serve.gateway, a FastAPI ingress) in front
of autoscaled model replicas (raymed.serve.replica.ModelServer, each running a
continuous-batching engine) and the Retriever (raymed.serve.retriever, the knowledge index
for grounded answers, scaled on its own), plus a tiny `MetricsStore` that collects every replica's
figures (the Gateway's replicas' own included) for `/metrics`.

Entry points: `build_app` (the Serve application builder that `serve run` / `serve deploy`
import: `raymed.serve.app:build_app`, args `config` and `set`) and `build_application`
(Python callers and tests).
"""

import os

from pydantic import BaseModel
from ray import serve
from ray.serve.config import BackpressureConfig

from raymed.config import Config, load_config
from raymed.serve.gateway import Gateway, api
from raymed.serve.metrics import MetricsStore
from raymed.serve.model_source import ServedModel, served_model
from raymed.serve.replica import ModelServer
from raymed.serve.retriever import bind_retriever  # issue 22: grounded answers

__all__ = ["AppArgs", "Gateway", "ModelServer", "api", "api_key", "autoscaling_config", "build_app",
           "build_application"]


# ---------------------------------------------------------------- building the app


class AppArgs(BaseModel):
    """What `serve run` / `serve deploy` pass to `build_app` (the `args:` of serve/config.yaml)."""

    config: str | None = None
    """A preset name or YAML path (raymed.config)."""
    set: list[str] = []
    """Overrides, as on the command line: `serve.max_replicas=4`."""


def build_app(args: AppArgs) -> serve.Application:
    """Serve application builder (`import_path: raymed.serve.app:build_app`)."""
    return build_application(load_config(args.config, args.set))


def build_application(config: Config, *, model: ServedModel | None = None, admission_gate=None,
                      retriever_gate=None) -> serve.Application:
    """The bound application for `config.serve`; `admission_gate` and `retriever_gate` are the tests' hooks.

    `model` defaults to `served_model(config)`, resolved once here: every replica serves the
    same directory (a registry version is pinned at this moment)."""
    settings = config.serve
    model = model or served_model(config)
    config_data = config.model_dump()
    store = serve.deployment(MetricsStore, name="MetricsStore", num_replicas=1,
                             ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000).bind()
    replicas = serve.deployment(ModelServer, name="ModelServer").options(
        autoscaling_config=autoscaling_config(settings),
        max_surge_percent=settings.rolling_surge_percent,
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=settings.overload_status,
                                               retry_after_s=settings.retry_after_s),
        ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
    ).bind(config_data, model.directory, store, admission_gate)
    gateway = serve.deployment(Gateway, name="Gateway", num_replicas=settings.gateway_replicas,
                               max_surge_percent=100, ray_actor_options={"num_cpus": 0},  # it needs no CPU
                               max_ongoing_requests=10_000)
    return gateway.bind(config_data, model, replicas, store, api_key(config), bind_retriever(config, retriever_gate))


def autoscaling_config(settings) -> dict:
    """Serve's `autoscaling_config` for the model replicas, from `serve.*`."""
    return {"min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
            "upscale_delay_s": settings.upscale_delay_s, "downscale_delay_s": settings.downscale_delay_s,
            "look_back_period_s": settings.autoscale_look_back_s}


def api_key(config: Config) -> str | None:
    """RAYMED_API_KEY wins over serve.api_key; neither set means no auth."""
    from_env = os.environ.get("RAYMED_API_KEY")
    if from_env:
        return from_env
    return config.serve.api_key.get_secret_value() if config.serve.api_key else None
