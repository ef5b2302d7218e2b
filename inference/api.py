"""The HTTP application: the endpoints' routers mounted, middleware, health, readiness, metrics.

In: a :class:`ServerState` (config, the served models' registry behind :class:`ServedRegistry`,
one engine per loaded version; the encoder, metrics, tracing). Out: an aiohttp application.
Each OpenAI endpoint is one folder of ``inference/openai/`` (protocol, serving, router); this
module only mounts their routes and
wraps them in the middleware that counts every request by route/status/tenant, tracks
in-flight work for draining, and turns every failure into ``{"error": {message, type, param, code}}``.
Knows nothing of torch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.models import MODEL_VERSION_HEADER, ROUTED_MODEL_HEADER
from common.replicas import LOAD_PATH, REPLICA_HEADER, LoadReport
from common.routes import MODEL_PATHS
from inference.config import InferenceConfig
from inference.generation import EngineStats
from inference.metrics import InferenceMetrics
from inference.openai import protocol
from inference.openai.chat import router as chat_router
from inference.openai.chat.protocol import parse_chat_request
from inference.openai.chat.serving import ChatServing
from inference.openai.completion import router as completion_router
from inference.openai.completion.protocol import parse_completion_request
from inference.openai.completion.serving import CompletionServing
from inference.openai.embeddings import router as embeddings_router
from inference.openai.embeddings.serving import EmbeddingBackend, EmbeddingServing
from inference.openai.http import USAGE, read_body, tenant_of
from inference.openai.protocol import RequestError
from inference.openai.serving import GenerationModels, ModelVersions, ServedModels, not_started
from inference.tracing import Tracing
from inference.usage import UsageReporter, UsageTracker, ending_of, finish_usage
from otel import names

log = logging.getLogger("kernelgate.inference.api")

CLIENT_CLOSED = 499


class ServedRegistry(ModelVersions, Protocol):
    """The served models and their versions (``inference.models.registry.ModelRegistry``)."""

    def names(self) -> list[str]: ...

    @property
    def ready(self) -> bool: ...

    @property
    def failure(self) -> BaseException | None: ...

    def routed_stats(self, model: str) -> list[EngineStats]:
        """The load of each version of ``model`` that new requests go to (active, canary)."""
        ...

    def rolled_back(self, model: str) -> list[str]: ...


@dataclass
class ServerState:
    """Everything the application holds; one per application."""

    config: InferenceConfig
    registry: ServedRegistry
    encoder: EmbeddingBackend | None
    metrics: InferenceMetrics
    tracing: Tracing
    preprocess_executor: Executor
    replica_id: str = ""
    started: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    usage: UsageReporter | None = None  # reports to the sidecar what each decision used

    @property
    def models(self) -> ServedModels:
        return ServedModels(tuple(self.registry.names()), self.encoder.name if self.encoder is not None else None)


STATE = web.AppKey("kernelgate_inference_state", ServerState)
# A non-streamed response waits this long for its usage report to land (it then goes out settled).
REPORT_WAIT_S = 0.5


def create_app(state: ServerState) -> web.Application:
    """The aiohttp application serving ``state``."""
    config = state.config
    app = web.Application(client_max_size=config.limits.max_body_bytes, middlewares=[_observe])
    app[STATE] = state
    state.idle.set()
    generation = GenerationModels(state.registry, state.models, config.limits.retry_after_s)
    embeddings = EmbeddingServing(state.encoder, state.models, config.embeddings.max_inputs,
                                  config.limits.retry_after_s)
    replica = state.replica_id
    app.add_routes(completion_router.routes(CompletionServing(generation), state.tracing, config.limits, replica))
    app.add_routes(chat_router.routes(ChatServing(generation), state.tracing, config.limits, replica))
    app.add_routes(embeddings_router.routes(embeddings, state.tracing, config.limits, replica))
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/tokenize", _tokenize(generation, config.limits.max_body_bytes))
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get(LOAD_PATH, _load)
    app.on_response_prepare.append(_name_replica)
    return app


async def _name_replica(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[REPLICA_HEADER] = request.app[STATE].replica_id


# -- middleware -----------------------------------------------------------------------------


@web.middleware
async def _observe(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                   ) -> web.StreamResponse:
    """Counts every request by route/status/tenant, tracks in-flight work, shapes errors."""
    state = request.app[STATE]
    route = _route_of(request)
    tenant = tenant_of(request.headers)
    started = time.monotonic()
    status = 500
    state.in_flight += 1
    state.idle.clear()
    usage = state.usage.track(request.headers) if state.usage is not None else UsageTracker(None, None)
    request[USAGE] = usage
    try:
        if state.draining and route in MODEL_PATHS:
            raise RequestError(503, "server is shutting down", type="service_unavailable",
                               code="shutting_down", headers=not_started(state.config.limits.retry_after_s))
        response = await handler(request)
        status = CLIENT_CLOSED if response.get("client_closed") else response.status
        return response
    except RequestError as err:
        status = err.status
        return _error_response(err)
    except web.HTTPException as exc:
        status = exc.status
        return _error_response(_from_http_exception(exc))
    except (asyncio.CancelledError, ConnectionResetError):
        status = CLIENT_CLOSED
        raise
    except Exception:  # noqa: BLE001 - becomes a 500 in OpenAI's shape
        log.exception("unhandled error serving %s %s", request.method, request.path)
        status = 500
        return _error_response(RequestError(500, "internal server error", type="server_error"))
    finally:
        # where every response ends: tell the sidecar what this decision used
        await finish_usage(usage, state.usage, ending_of(status, status == CLIENT_CLOSED), REPORT_WAIT_S)
        state.in_flight -= 1
        if state.in_flight == 0:
            state.idle.set()
        state.metrics.requests.labels(route, str(status), tenant).inc()
        state.metrics.request_seconds.labels(route).observe(time.monotonic() - started)


def _route_of(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


def _error_response(err: RequestError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers)


def _from_http_exception(exc: web.HTTPException) -> RequestError:
    if exc.status == 413:
        return RequestError(413, "request body is larger than the server accepts", code="request_too_large")
    if exc.status == 404:
        return RequestError(404, "no such route", code="not_found")
    if exc.status == 405:
        return RequestError(405, "method not allowed", code="method_not_allowed")
    return RequestError(exc.status, exc.reason or "HTTP error")


# -- models, health, readiness, metrics ---------------------------------------------------------


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    models = [(name, state.started) for name in state.registry.names()]
    if state.encoder is not None:
        models.append((state.encoder.name, state.started))
    return web.json_response(protocol.model_list(models))


def _tokenize(generation: GenerationModels, limit: int) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``POST /tokenize`` -> ``{"count": n, "max_model_len": m}``: the prompt of a completion or chat
    body, tokenized as generation would (same tokenizer, chat template and checks, of the version
    the request would be served by); the sidecar prices admission by it."""

    async def handle(request: web.Request) -> web.Response:
        data = protocol.parse_json(await read_body(request, limit))
        if "messages" in data:
            chat = parse_chat_request(data)
            model, tokenize = chat.model, (lambda p: [p.chat(chat)])
        else:
            completion = parse_completion_request(data)
            model, tokenize = completion.model, (lambda p: p.completion(completion))
        lease = generation.lease(generation.served_model(model, request.headers.get(ROUTED_MODEL_HEADER)),
                                 request.headers.get(MODEL_VERSION_HEADER))
        try:
            serving = lease.serving
            serving.check_ready()
            prompts = await serving.prepare(tokenize)
            return web.json_response({"count": sum(len(p.token_ids) for p in prompts),
                                      "max_model_len": serving.max_model_len})
        finally:
            lease.release()

    return handle


async def _healthz(request: web.Request) -> web.Response:
    failure = request.app[STATE].registry.failure
    if failure is not None:
        return web.json_response({"status": "failed", "error": str(failure)}, status=503)
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    checks = {"model": state.registry.ready, "draining": not state.draining}
    if state.encoder is not None:
        checks["embeddings"] = state.encoder.ready
    ready = all(checks.values())
    return web.json_response({"status": "ready" if ready else "not ready", "checks": checks},
                             status=200 if ready else 503)


async def _load(request: web.Request) -> web.Response:
    """This replica's load (common.replicas.LoadReport), one report per served model: the sidecar
    polls it to learn saturation, and which canaries this server rolled back. A model's load is
    that of the versions new requests go to."""
    state = request.app[STATE]
    reports = []
    for served in state.config.served_models:
        stats = state.registry.routed_stats(served.name)
        reports.append(LoadReport(replica=state.replica_id, model=served.name,
                                  ready=bool(stats) and not state.draining,
                                  running=sum(s.running for s in stats), waiting=sum(s.waiting for s in stats),
                                  max_batch_size=served.batching.max_batch_size * max(len(stats), 1),
                                  max_queue=served.batching.max_queue * max(len(stats), 1),
                                  rolled_back=tuple(state.registry.rolled_back(served.name))))
    report = replace(reports[0], models=tuple(reports[1:]))
    return web.json_response(report.to_json())


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = generate_latest(state.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
