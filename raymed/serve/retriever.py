"""The `Retriever` deployment: searches the knowledge index for the Gateway.

It loads the index once per replica and scales on its own `autoscaling_config`
(`serve.retriever.*`), apart from the model replicas. A missing or damaged index does not
stop the application: the replica starts, logs the error (which names `raymed index
build`) and answers every search with it, so the Gateway answers ungrounded with a warning.
Queries and passages are never logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ray import serve

from raymed.config import Config, IndexConfig
from raymed.serve import safety

logger = logging.getLogger("ray.serve")


class Retriever:
    """One replica: the loaded index (or why there is none).

    `admission_gate` is a test hook, as on the model replicas: an actor whose `wait()` each
    search awaits, so a test can hold searches in flight and watch the autoscaler."""

    def __init__(self, index_data: dict, cache_dir: str, admission_gate=None):
        from raymed.index import IndexUnavailable, open_index

        safety.install_log_redaction()
        settings = IndexConfig.model_validate(index_data)
        self.index, self.problem = None, None
        try:
            self.index = open_index(settings, Path(cache_dir))
        except IndexUnavailable as err:
            self.problem = str(err)
            logger.warning("answers are not grounded: %s", err)
        self._gate = admission_gate

    async def search(self, query: str, k: int) -> dict:
        """`{"passages": [...], "error": None}`, or no passages and the reason."""
        if self._gate is not None:
            await self._gate.wait.remote()
        if self.index is None:
            return {"passages": [], "error": self.problem}
        try:
            return {"passages": self.index.search(query, k), "error": None}
        except ValueError as err:
            return {"passages": [], "error": f"the question cannot be searched: {err}"}


def retriever_autoscaling(config: Config) -> dict:
    """Serve's `autoscaling_config` for the Retriever, from `serve.retriever.*`."""
    settings = config.serve.retriever
    return {"min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
            "upscale_delay_s": settings.upscale_delay_s, "downscale_delay_s": settings.downscale_delay_s}


def bind_retriever(config: Config, admission_gate=None):
    """The bound Retriever deployment, or None when grounding is off for this deploy. The
    cache directory is resolved here, at deploy time, like the served model."""
    from raymed.assets.cache import default_cache_dir
    from raymed.serve.grounding import grounding_enabled

    if not grounding_enabled(config.serve):
        return None
    settings = config.serve.retriever
    return serve.deployment(Retriever, name="Retriever").options(
        autoscaling_config=retriever_autoscaling(config), max_ongoing_requests=64,
        ray_actor_options={"num_cpus": settings.num_cpus},
    ).bind(config.index.model_dump(), str(default_cache_dir()), admission_gate)
