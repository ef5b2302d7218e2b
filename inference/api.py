"""The HTTP front end: aiohttp routes, SSE framing, OpenAI-shaped errors, request metrics.

Knows nothing of torch: it talks to the generation service, the encoder and the metrics
objects it is given. Every failure leaves as ``{"error": {message, type, param, code}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.replicas import LOAD_PATH, NOT_STARTED_HEADER, REPLICA_HEADER, LoadReport
from common.routes import MODEL_PATHS
from inference import protocol
from inference.config import InferenceConfig
from inference.generation import EngineDeadError, EngineNotReadyError, QueueFullError
from inference.metrics import InferenceMetrics
from inference.protocol import RequestError
from inference.serving import GenerationService, RequestContext
from inference.tracing import Tracing
from otel import names

log = logging.getLogger("kernelgate.inference.api")

TENANT_HEADER = "x-kernelgate-tenant"
# The model the gateway routed this request to (the policy may degrade to a fallback model).
ROUTED_MODEL_HEADER = "x-kernelgate-model"
_TENANT_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
CLIENT_CLOSED = 499


class EmbeddingBackend(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def ready(self) -> bool: ...

    async def embed(self, texts: list[str], encoding_format: str) -> Any: ...


@dataclass
class ServerState:
    """Everything the handlers use; one per application."""

    config: InferenceConfig
    generation: GenerationService
    encoder: EmbeddingBackend | None
    metrics: InferenceMetrics
    tracing: Tracing
    replica_id: str = ""
    started: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)


STATE = web.AppKey("kernelgate_inference_state", ServerState)


def create_app(state: ServerState) -> web.Application:
    """The aiohttp application serving ``state``."""
    app = web.Application(client_max_size=state.config.limits.max_body_bytes, middlewares=[_observe])
    app[STATE] = state
    state.idle.set()
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get(LOAD_PATH, _load)
    app.on_response_prepare.append(_name_replica)
    return app


async def _name_replica(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[REPLICA_HEADER] = request.app[STATE].replica_id


def _not_started(state: ServerState) -> dict[str, str]:
    """Headers of a refusal answered before any work started: Envoy may retry it on another replica."""
    return {"Retry-After": str(state.config.limits.retry_after_s), NOT_STARTED_HEADER: "1"}


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
    try:
        if state.draining and route in MODEL_PATHS:
            raise RequestError(503, "server is shutting down", type="service_unavailable",
                               code="shutting_down", headers=_not_started(state))
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
        state.in_flight -= 1
        if state.in_flight == 0:
            state.idle.set()
        state.metrics.requests.labels(route, str(status), tenant).inc()
        state.metrics.request_seconds.labels(route).observe(time.monotonic() - started)


def _route_of(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


def tenant_of(headers: Any) -> str:
    """The tenant the sidecar vouched for, as a safe label value ('none' when absent)."""
    value = headers.get(TENANT_HEADER)
    if not value:
        return "none"
    return value if _TENANT_RE.match(value) else "invalid"


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


# -- generation -----------------------------------------------------------------------------


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    state = request.app[STATE]
    attributes = {names.GEN_AI_OPERATION_NAME: "chat" if kind == "chat" else "text_completion",
                  names.TENANT: tenant_of(request.headers),
                  names.REPLICA_ID: state.replica_id}
    with state.tracing.request_span(names.http_server_span_name("POST", request.path), request.headers,
                                    attributes) as span:
        data = protocol.parse_json(await _read_body(request, state))
        parsed = protocol.parse_chat_request(data) if kind == "chat" else protocol.parse_completion_request(data)
        model = _served_model(state, request.headers, parsed.model)
        sampling = parsed.sampling
        span.set_attribute(names.GEN_AI_REQUEST_MODEL, parsed.model)
        span.set_attribute(names.GEN_AI_RESPONSE_MODEL, model)
        span.set_attribute(names.GEN_AI_REQUEST_TEMPERATURE, sampling.temperature)
        span.set_attribute(names.GEN_AI_REQUEST_TOP_P, sampling.top_p)
        if sampling.max_tokens is not None:
            span.set_attribute(names.GEN_AI_REQUEST_MAX_TOKENS, sampling.max_tokens)
        if sampling.seed is not None:
            span.set_attribute(names.GEN_AI_REQUEST_SEED, sampling.seed)
        _check_ready(state)
        prompts = await state.generation.prepare(parsed)
        ctx = RequestContext(request_id=f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
                             model=model, tenant=tenant_of(request.headers), span=span)
        streams = _submit(state, ctx, prompts)
        span.set_attribute(names.GEN_AI_RESPONSE_ID, ctx.request_id)
        timeout = state.config.limits.request_timeout_s
        try:
            if sampling.stream:
                return await _send_sse(request, state.generation.stream(kind, ctx, streams, sampling.include_usage),
                                       timeout)
            try:
                async with asyncio.timeout(timeout):
                    body = await state.generation.complete(kind, ctx, streams)
            except TimeoutError:
                raise RequestError(504, f"request did not finish within {timeout:g}s", type="timeout",
                                   code="request_timeout") from None
            return web.json_response(body)
        except EngineDeadError as exc:
            raise RequestError(503, str(exc), type="server_error", code="engine_failed") from None
        finally:
            span.set_attribute(names.GEN_AI_USAGE_INPUT_TOKENS, ctx.prompt_tokens)
            span.set_attribute(names.GEN_AI_USAGE_OUTPUT_TOKENS, ctx.completion_tokens)
            if ctx.finish_reasons:
                span.set_attribute(names.GEN_AI_RESPONSE_FINISH_REASONS, ctx.finish_reasons)


def _submit(state: ServerState, ctx: RequestContext, prompts: list[Any]) -> list[Any]:
    retry_after = _not_started(state)
    try:
        return state.generation.submit(ctx, prompts)
    except QueueFullError as exc:
        raise RequestError(429, f"{exc}; retry later", type="rate_limit_error", code="queue_full",
                           headers=retry_after) from None
    except EngineNotReadyError as exc:
        raise RequestError(503, str(exc), type="service_unavailable", code="not_ready", headers=retry_after) from None
    except EngineDeadError as exc:
        raise RequestError(503, str(exc), type="server_error", code="engine_failed", headers=retry_after) from None


async def _send_sse(request: web.Request, chunks: AsyncIterator[dict[str, Any]], timeout: float) -> web.StreamResponse:
    """Write ``data: {...}`` events, then ``data: [DONE]``; a vanished client ends it early."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    try:
        async with aclosing(chunks) as events:
            try:
                async with asyncio.timeout(timeout):
                    async for chunk in events:
                        await response.write(_sse_event(chunk))
            except TimeoutError:
                err = RequestError(504, f"request did not finish within {timeout:g}s", type="timeout",
                                   code="request_timeout")
                await response.write(_sse_event(err.body()))
            except RequestError as err:
                await response.write(_sse_event(err.body()))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        response["client_closed"] = True
    return response


def _sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


# -- embeddings -----------------------------------------------------------------------------


async def _embeddings(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    attributes = {names.GEN_AI_OPERATION_NAME: "embeddings", names.TENANT: tenant_of(request.headers)}
    with state.tracing.request_span(names.http_server_span_name("POST", request.path), request.headers,
                                    attributes) as span:
        data = protocol.parse_json(await _read_body(request, state))
        max_inputs = state.config.embeddings.max_inputs
        parsed = protocol.parse_embedding_request(data, max_inputs)
        encoder = state.encoder
        if encoder is None or parsed.model != encoder.name:
            if parsed.model == state.config.model.name:
                raise RequestError(400, f"model '{parsed.model}' does not support embeddings", "model")
            raise RequestError(404, f"model '{parsed.model}' does not exist", "model", code="model_not_found")
        span.set_attribute(names.GEN_AI_REQUEST_MODEL, parsed.model)
        if not encoder.ready:
            raise RequestError(503, "embeddings model is not ready", type="service_unavailable", code="not_ready",
                               headers={"Retry-After": str(state.config.limits.retry_after_s)})
        result = await encoder.embed(list(parsed.inputs), parsed.encoding_format)
        span.set_attribute(names.GEN_AI_USAGE_INPUT_TOKENS, result.prompt_tokens)
        return web.json_response(protocol.embedding_object(parsed.model, result.vectors, result.prompt_tokens))


# -- plumbing -------------------------------------------------------------------------------


async def _read_body(request: web.Request, state: ServerState) -> bytes:
    limit = state.config.limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RequestError(413, f"request body is {request.content_length} bytes; the limit is {limit}",
                           code="request_too_large")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestError(413, f"request body is larger than the limit of {limit} bytes",
                           code="request_too_large") from None


def _served_model(state: ServerState, headers: Any, requested: str) -> str:
    """The model that serves the request: ours, when the body or the gateway's routing names it."""
    if requested == state.config.model.name or headers.get(ROUTED_MODEL_HEADER) == state.config.model.name:
        return state.config.model.name
    _check_generation_model(state, requested)
    return requested


def _check_generation_model(state: ServerState, model: str) -> None:
    if model == state.config.model.name:
        return
    if state.encoder is not None and model == state.encoder.name:
        raise RequestError(400, f"model '{model}' is an embeddings model; use /v1/embeddings", "model")
    raise RequestError(404, f"model '{model}' does not exist", "model", code="model_not_found")


def _check_ready(state: ServerState) -> None:
    engine = state.generation.engine
    if not engine.ready:
        raise RequestError(503, "model is still loading", type="service_unavailable", code="not_ready",
                           headers=_not_started(state))


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    models = [(state.config.model.name, state.started)]
    if state.encoder is not None:
        models.append((state.encoder.name, state.started))
    return web.json_response(protocol.model_list(models))


async def _healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    failure = getattr(state.generation.engine, "failure", None)
    if failure is not None:
        return web.json_response({"status": "failed", "error": str(failure)}, status=503)
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    checks = {"model": state.generation.engine.ready, "draining": not state.draining}
    if state.encoder is not None:
        checks["embeddings"] = state.encoder.ready
    ready = all(checks.values())
    return web.json_response({"status": "ready" if ready else "not ready", "checks": checks},
                             status=200 if ready else 503)


async def _load(request: web.Request) -> web.Response:
    """This replica's load (common.replicas.LoadReport): the sidecar polls it to learn saturation."""
    state = request.app[STATE]
    engine = state.generation.engine
    stats = engine.stats()  # type: ignore[attr-defined]
    batching = state.config.batching
    report = LoadReport(replica=state.replica_id, model=state.config.model.name,
                        ready=bool(engine.ready) and not state.draining, running=stats.running,
                        waiting=stats.waiting, max_batch_size=batching.max_batch_size, max_queue=batching.max_queue)
    return web.json_response(report.to_json())


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = generate_latest(state.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
