"""The HTTP face (`Gateway`, the FastAPI ingress on Ray Serve): auth, body limits, OpenAI
routes and shapes, SSE, errors and metrics, in front of the model replicas.

    client ──HTTP──▶ Gateway (validate, prepare, auth, safety, errors, SSE) ──handle──▶ ModelServer × N
                        └──handle──▶ Retriever × M (grounded chat answers: raymed.serve.grounding)

Request preparation (template, tokens, work orders) is raymed.serve.prepare; streams are
raymed.serve.streaming; the medical safety layer (raymed.serve.safety) applies outside the model.
"""


import asyncio
import hmac
import json
import logging
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from raymed.config import Config
from raymed.serve import errors, safety
from raymed.serve.grounding import Grounder  # issue 22: grounded answers
from raymed.serve.metrics import IngressMetrics
from raymed.serve.model_source import ServedModel, sampling_defaults, vocab_size
from raymed.serve.prepare import Plan, RequestPreparer
from raymed.serve.protocol import ChatCompletionRequest, CompletionRequest, openapi_body, parse_request
from raymed.serve.responses import chat_choice, chat_completion, completion, completion_choice, usage
from raymed.serve.streaming import sse_chunks

logger = logging.getLogger("ray.serve")

api = FastAPI(title="raymed", docs_url=None, redoc_url=None, openapi_url=None)

STATIC_DIR = Path(__file__).resolve().parent / "static"
INGRESS_REPORT_EVERY_S = 1.0
"""How often each of several Gateway replicas pushes its ingress figures to the MetricsStore."""


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and wrong methods get OpenAI's error shape too."""
    return errors.APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                           headers=getattr(exc, "headers", None)).response()


def _static_file(name: str) -> bytes:
    """One of the chat page's files (shipped as package data)."""
    return (STATIC_DIR / name).read_bytes()


async def _resolved(response):
    return await response


# Decorated at import time, so every replica that imports this module gets the routes;
# Serve copies the methods then, so whatever they use is defined above.
@serve.ingress(api)
class Gateway:
    """The HTTP face: auth, validation, OpenAI shapes, SSE, errors, metrics."""

    def __init__(self, config_data: dict, model: ServedModel, model_handle, metrics_store, api_key: str | None,
                 retriever=None):
        from transformers import AutoTokenizer

        safety.install_log_redaction()
        self.config = Config.model_validate(config_data).serve
        self.model = model
        self.sampling_defaults = sampling_defaults(Path(model.directory), self.config)
        self.grounder = Grounder(retriever, self.config.grounding_k)  # retriever None: grounding off
        self.prepare = RequestPreparer(AutoTokenizer.from_pretrained(model.directory), model, self.config,
                                       self.sampling_defaults, vocab_size(Path(model.directory)), self.grounder)
        self.replicas = model_handle
        self.store = metrics_store
        self.metrics = IngressMetrics()
        self.gateway_id = serve.get_replica_context().replica_id.unique_id
        self._reporter: asyncio.Task | None = None
        self._api_key = api_key.encode() if api_key else None

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

    @api.get("/v1/models/{model_id}")
    async def retrieve_model(self, model_id: str, request: Request) -> Response:
        async def one(request, request_id):
            if model_id != self.model.name:
                raise errors.model_not_found(model_id, self.model.name)
            return JSONResponse(self._model_card())

        return await self._handle("models", request, one)

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
        if self._reporter is None and self.config.gateway_replicas > 1:
            self._reporter = asyncio.create_task(self._report_forever())
        return response

    async def _report_forever(self) -> None:
        """Push this replica's ingress figures to the MetricsStore, for the scrapes that
        another Gateway replica answers (see raymed.serve.metrics)."""
        while True:
            await asyncio.sleep(INGRESS_REPORT_EVERY_S)
            try:
                await self.store.report_ingress.remote(self.gateway_id, self.metrics.families())
            except Exception:  # the store restarting must not take the Gateway down
                logger.warning("could not report the ingress metrics", exc_info=True)

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._api_key):
            raise errors.unauthorized("Missing or wrong API key: send `Authorization: Bearer <key>`")

    # -- routes

    def _model_card(self) -> dict:
        return {"id": self.model.name, "object": "model", "created": 0, "owned_by": "raymed",
                "max_model_len": self.model.context_length, "version": self.model.version,
                "sampling_defaults": self.sampling_defaults}

    async def _models(self, request: Request, request_id: str) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def _prometheus(self, request: Request, request_id: str) -> Response:
        snapshots = await self.store.snapshots.remote()
        other_gateways = await self.store.ingress.remote(self.gateway_id)
        return Response(self.metrics.render(snapshots, other_gateways), media_type="text/plain; version=0.0.4")

    async def _chat(self, request: Request, request_id: str) -> Response:
        body = await self._parse(request, ChatCompletionRequest)
        return await self._generate(await self.prepare.chat(body, request_id))

    async def _completions(self, request: Request, request_id: str) -> Response:
        body = await self._parse(request, CompletionRequest)
        return await self._generate(await self.prepare.completions(body, request_id))

    # -- validation

    async def _parse(self, request: Request, kind):
        raw = await self._read_body(request)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise errors.bad_request(f"The body is not valid JSON: {err}", code="invalid_json") from None
        body = parse_request(data, kind)
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

    # -- generation

    def _marks(self, flags: safety.SafetyCheck) -> dict:
        """What every answer carries besides the text: the safety object and which model version wrote it."""
        return {"safety": safety.safety_field(flags), "system_fingerprint": self.model.fingerprint()}

    async def _generate(self, plan: Plan) -> Response:
        body = plan.body
        logger.info("request %s %s: prompt_tokens=%d choices=%d max_tokens=%d stream=%s red_flags=%s",
                    plan.request_id, plan.route, plan.prompt_tokens, len(plan.jobs),
                    plan.jobs[0]["sampling"]["max_tokens"], body.stream, ",".join(plan.flags.categories) or "-")
        marks = {**self._marks(plan.flags), **plan.grounding_marks}  # citations ride with the safety marks
        if body.stream:
            return await self._stream(plan, marks)
        started = time.perf_counter()
        responses = [self.replicas.generate.remote(job) for job in plan.jobs]
        try:
            results = await asyncio.wait_for(asyncio.gather(*(_resolved(r) for r in responses)),
                                             self.config.request_timeout_s)
        except TimeoutError:
            for response in responses:
                response.cancel()
            raise errors.timed_out(self.config.request_timeout_s) from None
        completion_tokens = sum(result["completion_tokens"] for result in results)
        self._observe(plan.route, started, plan.prompt_tokens, completion_tokens)
        used = usage(plan.prompt_tokens, completion_tokens)
        if plan.route == "chat":
            choices = [chat_choice(i, safety.banner(plan.flags) + r["text"],  # the banner: outside the model
                                   r["finish_reason"], r["logprobs"] if body.logprobs else None)
                       for i, r in enumerate(results)]
            return JSONResponse({**chat_completion(plan.request_id, body.model, choices, used), **marks})
        choices = [self._completion_choice(plan, i, r) for i, r in enumerate(results)]
        return JSONResponse({**completion(plan.request_id, body.model, choices, used), **marks})

    @staticmethod
    def _completion_choice(plan: Plan, index: int, result: dict) -> dict:
        """The model's text (the red-flag banner rides in `safety`, so a harness scores the
        model's own words), led by the prompt when `echo`."""
        body = plan.body
        logprobs = None
        if body.logprobs is not None:
            logprobs = (result["prompt_logprobs"] or []) + result["logprobs"] if body.echo else result["logprobs"]
        return completion_choice(index, plan.echo_texts[plan.prompt_of(index)] + result["text"],
                                 result["finish_reason"], logprobs)

    async def _stream(self, plan: Plan, marks: dict) -> Response:
        """SSE. Every choice's first event is awaited before answering, so overload still
        gets its 503/429 (not a 200 stream that then breaks)."""
        started = time.perf_counter()
        deadline = started + self.config.request_timeout_s
        streams = [self.replicas.options(stream=True).generate_stream.remote(job) for job in plan.jobs]
        try:
            firsts = await asyncio.wait_for(asyncio.gather(*(s.__anext__() for s in streams)),
                                            self.config.request_timeout_s)
        except TimeoutError:
            for stream in streams:
                stream.cancel()
            raise errors.timed_out(self.config.request_timeout_s) from None
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        self.metrics.ttft.labels(plan.route).observe(time.perf_counter() - started)
        chunks = sse_chunks(plan, streams, list(firsts), marks, deadline, self.config,
                            on_finished=lambda tokens: self._observe(plan.route, started, plan.prompt_tokens, tokens),
                            on_cancelled=lambda: self.metrics.cancelled.labels(plan.route).inc())
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _observe(self, route: str, started: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.metrics.latency.labels(route).observe(time.perf_counter() - started)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.completion_tokens.inc(completion_tokens)
