"""The Serve application: a FastAPI ingress (`Gateway`) in front of autoscaled model
replicas (`ModelServer`, each running a continuous-batching engine), plus a tiny
`MetricsStore` that collects every replica's figures for `/metrics`.

    client ──HTTP──▶ Gateway (validate, tokenize, auth, safety, errors, SSE) ──handle──▶ ModelServer × N

The Gateway also serves the chat page (`/`, `/chat.js`) and applies the medical safety layer
(raymed.serve.safety) outside the model.

Entry points: `build_app` (the Serve application builder that `serve run` / `serve deploy`
import: `raymed.serve.app:build_app`, args `config` and `set`) and `build_application`
(Python callers and tests).
"""


import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from pathlib import Path
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from raymed.config import Config, load_config
from raymed.serve import errors, safety
from raymed.serve.grounding import Grounder  # issue 22: grounded answers
from raymed.serve.retriever import bind_retriever
from raymed.serve.engine import BatchingEngine, SamplingParams
from raymed.serve.metrics import IngressMetrics, MetricsStore
from raymed.serve.model_source import ServedModel, context_length, eos_token_ids, load_for_inference, served_model
from raymed.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_completion,
    completion,
    openapi_body,
    usage,
    usage_chunk,
)

logger = logging.getLogger("ray.serve")

REPORT_EVERY_S = 0.5
"""How often a busy replica pushes its figures to the MetricsStore (idle: every 5 s)."""
IDLE_REPORT_EVERY_S = 5.0

api = FastAPI(title="raymed", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and wrong methods get OpenAI's error shape too."""
    return errors.APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                           headers=getattr(exc, "headers", None)).response()


# ---------------------------------------------------------------- model replicas


class ModelServer:
    """One model replica: loads the model once and runs the batching engine.

    `admission_gate` is a test hook: an actor whose `wait()` each request awaits before it
    is admitted, so a test can hold a replica busy deterministically (no sleeps)."""

    async def __init__(self, config_data: dict, model_dir: str, metrics_store=None, admission_gate=None):
        import torch

        safety.install_log_redaction()
        serve_config = Config.model_validate(config_data).serve
        torch.set_num_threads(max(1, int(serve_config.num_cpus)))
        model, tokenizer = await asyncio.to_thread(load_for_inference, model_dir, serve_config)
        self.engine = BatchingEngine(
            model, tokenizer, max_batch_size=serve_config.max_batch_size,
            context_length=context_length(Path(model_dir)),
            eos_token_ids=eos_token_ids(model, tokenizer), on_step=self._mark_changed,
            cuda_graphs=serve_config.cuda_graphs,
        )
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._gate = admission_gate
        self._store = metrics_store
        self._changed = asyncio.Event()
        self._reporter = asyncio.create_task(self._report_forever()) if metrics_store else None

    async def generate_stream(self, job: dict) -> AsyncIterator[dict]:
        """Events for one request: `{"text", "completion_tokens", "finish_reason"}`."""
        if self._gate is not None:
            await self._gate.wait.remote()
        started = time.perf_counter()
        first_token_s = None
        params = SamplingParams(**job["sampling"])
        logger.info("request %s admitted: prompt_tokens=%d max_tokens=%d", job["request_id"],
                    len(job["prompt_ids"]), params.max_tokens)
        async for event in self.engine.generate(job["request_id"], job["prompt_ids"], params):
            if first_token_s is None:
                first_token_s = time.perf_counter() - started
            yield {"text": event.text, "completion_tokens": event.completion_tokens,
                   "finish_reason": event.finish_reason}
        logger.info("request %s finished: completion_tokens=%d finish=%s ttft_s=%.3f total_s=%.3f",
                    job["request_id"], event.completion_tokens, event.finish_reason, first_token_s,
                    time.perf_counter() - started)

    async def generate(self, job: dict) -> dict:
        """The whole answer at once: `{"text", "completion_tokens", "finish_reason"}`."""
        text = []
        async for event in self.generate_stream(job):
            text.append(event["text"])
        return {**event, "text": "".join(text)}

    def _mark_changed(self) -> None:
        self._changed.set()

    async def _report_forever(self) -> None:
        """Push this replica's figures to the MetricsStore (often while busy, rarely idle)."""
        while True:
            try:
                await self._store.report.remote(self.replica, self.engine.stats.snapshot())
            except Exception:  # the store restarting must not take the replica down
                logger.warning("could not report metrics", exc_info=True)
            try:
                await asyncio.wait_for(self._changed.wait(), IDLE_REPORT_EVERY_S)
            except TimeoutError:
                pass
            self._changed.clear()
            await asyncio.sleep(REPORT_EVERY_S)


# ---------------------------------------------------------------- the ingress


class _ChunkShape:
    """Builds stream chunks in the route's shape (chat deltas or completion text)."""

    def __init__(self, route: str, request_id: str, model: str):
        self.route, self.request_id, self.model = route, request_id, model
        self.kind = "chat.completion.chunk" if route == "chat" else "text_completion"

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        if self.route == "chat":
            return chat_chunk(self.request_id, self.model, {"content": text} if text else {}, finish_reason)
        return completion(self.request_id, self.model, text, finish_reason, None)

    def opening(self, marks: dict) -> dict:
        """The first chunk: the assistant role (chat), the safety banner's text if any, and the marks."""
        banner = marks["safety"]["banner"] or ""
        if self.route == "chat":
            delta = {"role": "assistant", "content": banner}
            return {**chat_chunk(self.request_id, self.model, delta), **marks}
        return {**completion(self.request_id, self.model, banner, None, None), **marks}


async def _resolved(response):
    return await response


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


STATIC_DIR = Path(__file__).resolve().parent / "static"


def _static_file(name: str) -> bytes:
    """One of the chat page's files (shipped as package data)."""
    return (STATIC_DIR / name).read_bytes()


# Decorated at import time, so every replica that imports this module gets the routes;
# Serve copies the methods then, so whatever they use is defined above.
@serve.ingress(api)
class Gateway:
    """The HTTP face: auth, validation, tokenization, OpenAI shapes, SSE, errors, metrics."""

    def __init__(self, config_data: dict, model: ServedModel, model_handle, metrics_store, api_key: str | None,
                 retriever=None):
        from transformers import AutoTokenizer

        safety.install_log_redaction()
        self.config = Config.model_validate(config_data).serve
        self.model = model
        self.tokenizer = AutoTokenizer.from_pretrained(model.directory)
        self.replicas = model_handle
        self.store = metrics_store
        self.metrics = IngressMetrics()
        self._api_key = api_key.encode() if api_key else None
        self.grounder = Grounder(retriever, self.config.grounding_k)

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.model.name}

    # The chat page's static files are open (like /health): the page asks for the key itself.
    @api.get("/")
    async def chat_page(self) -> Response:
        return HTMLResponse(_static_file("index.html"), headers={"Cache-Control": "no-cache"})

    @api.get("/chat.js")
    async def chat_script(self) -> Response:
        return Response(_static_file("chat.js"), media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        return await self._handle("models", request, self._models)

    @api.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle("chat", request, self._chat)

    @api.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest))
    async def completions(self, request: Request) -> Response:
        return await self._handle("completions", request, self._completions)

    @api.get("/metrics")
    async def prometheus(self, request: Request) -> Response:
        return await self._handle("metrics", request, self._prometheus)

    # -- one place that turns failures into HTTP

    async def _handle(self, route: str, request: Request, handler) -> Response:
        request_id = f"{'chatcmpl' if route == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        try:
            self._authorize(request)
            response = await handler(request, request_id)
        except errors.APIError as err:
            response = err.response()
        except BackPressureError as err:
            response = errors.overloaded(err.status_code, err.retry_after_s).response()
        except DeploymentUnavailableError:
            response = errors.overloaded(503, self.config.retry_after_s).response()
        except (RayActorError, ReplicaUnavailableError):  # the replica died with the request on it
            logger.warning("request %s lost its model replica", request_id, exc_info=True)
            response = errors.replica_lost(request_id, self.config.retry_after_s).response()
        except Exception:
            logger.exception("request %s failed", request_id)
            response = errors.server_error(request_id).response()
        if route != "metrics":
            self.metrics.requests.labels(route, str(response.status_code)).inc()
        if response.status_code >= 400:
            logger.info("request %s %s rejected: status=%d", request_id, route, response.status_code)
        return response

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._api_key):
            raise errors.unauthorized("Missing or wrong API key: send `Authorization: Bearer <key>`")

    # -- routes

    async def _models(self, request: Request, request_id: str) -> Response:
        card = {"id": self.model.name, "object": "model", "created": 0, "owned_by": "raymed",
                "max_model_len": self.model.context_length, "version": self.model.version}
        return JSONResponse({"object": "list", "data": [card]})

    async def _prometheus(self, request: Request, request_id: str) -> Response:
        snapshots = await self.store.snapshots.remote()
        return Response(self.metrics.render(snapshots), media_type="text/plain; version=0.0.4")

    async def _chat(self, request: Request, request_id: str) -> Response:
        body = await self._parse(request, ChatCompletionRequest)
        messages = body.chat()
        flags = safety.check([m["content"] for m in messages if m["role"] == "user"])  # the user's own text only
        grounded = await self.grounder.ground(request_id, body.grounding, messages)
        try:
            prompt_ids, grounded = grounded.fit(safety.with_system_prompt(messages), self._chat_ids,
                                                self.model.context_length)
        except Exception as err:  # a template that rejects these messages (e.g. roles out of order)
            raise errors.bad_request(f"the model's chat template rejects these messages: {err}", "messages") from None
        return await self._generate("chat", request_id, body, list(prompt_ids), flags, grounded.marks())

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]

    async def _completions(self, request: Request, request_id: str) -> Response:
        body = await self._parse(request, CompletionRequest)
        flags = safety.check([body.prompt])
        return await self._generate("completions", request_id, body, self.tokenizer(body.prompt)["input_ids"], flags)

    # -- validation

    async def _parse(self, request: Request, kind: type[BaseModel]):
        raw = await self._read_body(request)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise errors.bad_request(f"The body is not valid JSON: {err}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise errors.bad_request("The body must be a JSON object", code="invalid_json")
        try:
            body = kind.model_validate(data)
        except ValidationError as err:
            raise errors.from_validation_error(err) from None
        if body.model != self.model.name:
            raise errors.model_not_found(body.model, self.model.name)
        return body

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        too_big = errors.APIError(413, f"The body is larger than {limit} bytes", code="body_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def _job(self, request_id: str, body, prompt_ids: list[int]) -> dict:
        """The replica's work order, after the length checks OpenAI makes."""
        context = self.model.context_length
        prompt_param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        if not prompt_ids:  # e.g. only control characters, which the tokenizer drops
            raise errors.bad_request("The prompt encodes to no tokens", param=prompt_param, code="empty_prompt")
        if len(prompt_ids) >= context:
            raise errors.bad_request(
                f"The prompt is {len(prompt_ids)} tokens; this model's context is {context} tokens",
                param=prompt_param, code="context_length_exceeded")
        room = context - len(prompt_ids)
        requested = body.requested_max_tokens()
        if requested is not None and requested > room:
            raise errors.bad_request(
                f"`max_tokens` must be <= {room} (context {context} minus {len(prompt_ids)} prompt tokens). "
                f"Given: {requested}", param="max_tokens", code="context_length_exceeded")
        max_tokens = requested if requested is not None else min(self.config.default_max_tokens, room)
        sampling = {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                    "seed": body.seed, "stop": tuple(body.stop or ())}
        return {"request_id": request_id, "prompt_ids": prompt_ids, "sampling": sampling}

    # -- generation

    def _marks(self, flags: safety.SafetyCheck) -> dict:
        """What every answer carries besides the text: the safety object and which model version wrote it."""
        return {"safety": safety.safety_field(flags), "system_fingerprint": self.model.fingerprint()}

    async def _generate(self, route: str, request_id: str, body, prompt_ids: list[int],
                        flags: safety.SafetyCheck, grounding_marks: dict | None = None) -> Response:
        job = self._job(request_id, body, list(prompt_ids))
        logger.info("request %s %s: prompt_tokens=%d max_tokens=%d stream=%s red_flags=%s", request_id, route,
                    len(prompt_ids), job["sampling"]["max_tokens"], body.stream, ",".join(flags.categories) or "-")
        marks = {**self._marks(flags), **(grounding_marks or {})}  # citations ride with the safety marks
        if body.stream:
            return await self._stream(route, request_id, body, job, marks)
        started = time.perf_counter()
        response = self.replicas.generate.remote(job)
        try:
            result = await asyncio.wait_for(_resolved(response), self.config.request_timeout_s)
        except TimeoutError:
            response.cancel()
            raise errors.timed_out(self.config.request_timeout_s) from None
        self._observe(route, started, len(prompt_ids), result["completion_tokens"])
        used = usage(len(prompt_ids), result["completion_tokens"])
        text = safety.banner(flags) + result["text"]  # the banner is added here, outside the model
        if route == "chat":
            return JSONResponse({**chat_completion(request_id, body.model, text, result["finish_reason"], used), **marks})
        return JSONResponse({**completion(request_id, body.model, text, result["finish_reason"], used), **marks})

    async def _stream(self, route: str, request_id: str, body, job: dict, marks: dict) -> Response:
        """SSE. The first event is awaited before answering, so overload still gets its
        503/429 (not a 200 stream that then breaks)."""
        started = time.perf_counter()
        deadline = started + self.config.request_timeout_s
        events = self.replicas.options(stream=True).generate_stream.remote(job)
        try:
            first = await asyncio.wait_for(events.__anext__(), self.config.request_timeout_s)
        except TimeoutError:
            events.cancel()
            raise errors.timed_out(self.config.request_timeout_s) from None
        self.metrics.ttft.labels(route).observe(time.perf_counter() - started)
        chunks = self._sse_chunks(route, request_id, body, job, first, events, deadline, started, marks)
        return StreamingResponse(chunks, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _sse_chunks(self, route, request_id, body, job, first, events, deadline, started, marks):
        shape = _ChunkShape(route, request_id, body.model)
        event = first
        try:
            yield _sse(shape.opening(marks))
            while True:
                if event["finish_reason"]:  # the last chunk repeats the safety marks
                    yield _sse({**shape.chunk(event["text"], event["finish_reason"]), **marks})
                elif event["text"]:
                    yield _sse(shape.chunk(event["text"], event["finish_reason"]))
                if event["finish_reason"] is not None:
                    break
                try:
                    event = await asyncio.wait_for(events.__anext__(), max(0.0, deadline - time.perf_counter()))
                except TimeoutError:
                    events.cancel()
                    yield _sse(errors.timed_out(self.config.request_timeout_s).body())
                    break
            final_usage = usage(len(job["prompt_ids"]), event["completion_tokens"])
            if event["finish_reason"] is not None:
                self._observe(route, started, len(job["prompt_ids"]), event["completion_tokens"])
                if body.include_usage_in_stream():
                    yield _sse(usage_chunk(request_id, body.model, shape.kind, final_usage))
            yield "data: [DONE]\n\n"
        except StopAsyncIteration:  # the replica ended the stream without a finish event
            yield _sse(errors.server_error(request_id).body())
        except (RayActorError, ReplicaUnavailableError):  # the replica died mid-stream
            logger.warning("request %s lost its model replica mid-stream", request_id, exc_info=True)
            yield _sse(errors.replica_lost(request_id, self.config.retry_after_s).body())
        except Exception:
            logger.exception("request %s failed mid-stream", request_id)
            yield _sse(errors.server_error(request_id).body())
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            self.metrics.cancelled.labels(route).inc()
            raise
        finally:
            events.cancel()  # a no-op when finished; frees the slot when the client went away

    def _observe(self, route: str, started: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.metrics.latency.labels(route).observe(time.perf_counter() - started)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.completion_tokens.inc(completion_tokens)


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
    gateway = serve.deployment(Gateway, name="Gateway", num_replicas=1, max_surge_percent=100,  # it needs no CPU
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
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
