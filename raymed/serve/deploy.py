"""Deploy (or roll forward) the Serve application on the Ray cluster in reach.

`deploy(config)` is what `raymed serve`, `jobs/deploy.py` and the pipeline call. Serve keeps
one application named `raymed`; deploying again with a new registry version (pinned here, at
deploy time) makes Serve start the new replicas before it drains and stops the old ones, so
requests in flight finish on the replica that took them.
"""

from __future__ import annotations

from dataclasses import dataclass

APP_NAME = "raymed"


@dataclass(frozen=True)
class Deployment:
    url: str
    """The OpenAI-compatible base URL (`.../v1`)."""
    model: str
    """The name clients put in `model`."""
    version: str | None
    """The registry version now served (None when serving a directory)."""
    auth: bool


def deploy(config) -> Deployment:
    """Start Serve if needed and (re)deploy the app for `config.serve`; returns once it is healthy."""
    from ray import serve

    from raymed.console import init_ray, serve_logging
    from raymed.serve.app import api_key, build_application
    from raymed.serve.model_source import served_model

    model = served_model(config)  # resolves, checks and pins the model before Ray starts
    application = build_application(config, model=model)
    init_ray()
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port}, logging_config=serve_logging())
    serve.run(application, name=APP_NAME, route_prefix="/", logging_config=serve_logging())
    return Deployment(url=base_url(config), model=model.name, version=model.version, auth=bool(api_key(config)))


def base_url(config) -> str:
    """The URL a client on this machine uses (loopback when Serve listens on every address)."""
    host = "127.0.0.1" if config.serve.host in ("0.0.0.0", "::") else config.serve.host
    return f"http://{host}:{config.serve.port}/v1"
