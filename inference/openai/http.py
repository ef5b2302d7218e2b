"""HTTP framing shared by the routers: body limits, the tenant header, JSON or SSE out.

In: an aiohttp request, and what a serving object returned (:class:`Served`: a response object,
an async iterator of chunks or the wait for either, and what the request started on the engine).
Out: an aiohttp response; what the request spent goes to its usage report from here. A stream is written as ``data: {...}`` events
and a final ``data: [DONE]``; an error or the request deadline mid-stream becomes one error
event in OpenAI's shape before ``[DONE]``. Nothing here knows what the objects mean.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson
from aiohttp import web
from opentelemetry.trace import Span

from common.models import MODEL_VERSION_HEADER, ROUTED_MODEL_HEADER
from inference.config import LimitsConfig
from inference.generation import RequestStream
from inference.openai.protocol import RequestError
from inference.tracing import Tracing
from inference.usage import UsageTracker, grant_of
from otel import names

TENANT_HEADER = "x-kernelgate-tenant"
# What this request spent, reported to the sidecar when its response ends (set by the app's middleware,
# given what a serving call produced by traced_handler).
USAGE = web.RequestKey("kernelgate_usage", UsageTracker)
_TENANT_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")



@dataclass(frozen=True)
class Framed:
    """A result with headers for its response (the model version that answered)."""

    body: dict[str, Any] | AsyncIterator[dict[str, Any]]
    headers: Mapping[str, str]


Result = dict[str, Any] | AsyncIterator[dict[str, Any]] | Framed
T = TypeVar("T")


def tenant_of(headers: Mapping[str, str]) -> str:
    """The tenant the sidecar vouched for, as a safe label value ('none' when absent)."""
    value = headers.get(TENANT_HEADER)
    if not value:
        return "none"
    return value if _TENANT_RE.match(value) else "invalid"


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, or a 413 when it is larger than ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise RequestError(413, f"request body is {request.content_length} bytes; the limit is {limit}",
                           code="request_too_large")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestError(413, f"request body is larger than the limit of {limit} bytes",
                           code="request_too_large") from None


def timeout_error(timeout_s: float) -> RequestError:
    return RequestError(504, f"request did not finish within {timeout_s:g}s", type="timeout", code="request_timeout")


async def before(deadline: float, timeout_s: float, call: Awaitable[T]) -> T:
    """``await call``, or a 504 once the loop's clock passes ``deadline``."""
    try:
        async with asyncio.timeout_at(deadline):
            return await call
    except TimeoutError:
        raise timeout_error(timeout_s) from None


async def respond(request: web.Request, result: Result, deadline: float, timeout_s: float) -> web.StreamResponse:
    """A JSON response for an object; a server-sent event stream for an async iterator."""
    headers: Mapping[str, str] = {}
    if isinstance(result, Framed):
        result, headers = result.body, result.headers
    if isinstance(result, dict):
        return web.Response(body=dumps(result), content_type="application/json", headers=headers)
    return await _send_sse(request, result, deadline, timeout_s, headers)


async def _send_sse(request: web.Request, chunks: Any, deadline: float, timeout_s: float,
                    headers: Mapping[str, str]) -> web.StreamResponse:
    """Write ``data: {...}`` events, then ``data: [DONE]``; a vanished client ends it early. The
    stream is closed however this ends (a client gone before the headers went out included)."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no", **headers})
    try:
        async with aclosing(chunks) as events:
            await response.prepare(request)
            try:
                async with asyncio.timeout_at(deadline):
                    async for chunk in events:
                        await response.write(sse_event(chunk))
            except TimeoutError:
                await response.write(sse_event(timeout_error(timeout_s).body()))
            except RequestError as err:
                await response.write(sse_event(err.body()))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        response["client_closed"] = True
    return response


def dumps(payload: dict[str, Any]) -> bytes:
    """A response object as JSON (orjson: the stdlib's float formatting made a completion with
    logprobs cost ~50x more to write)."""
    return orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS)


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + dumps(payload) + b"\n\n"


@dataclass(frozen=True)
class Caller:
    """What the gateway vouched for about a request: the tenant, and the model it routed the request to."""

    tenant: str
    routed_model: str | None = None
    # The version of the model the sidecar picked (a canary split), or None for the active one.
    model_version: str | None = None
    # The sidecar's token grant (mid-stream enforcement caps max_tokens at it), or None.
    grant: int | None = None


@dataclass(frozen=True)
class Served:
    """What a serving call produced: the response (or the wait for it), and what the request spent: the
    engine streams it started (their final counts) and prompt tokens counted outside the engine (embeddings)."""

    response: Result | Awaitable[Result]
    streams: tuple[RequestStream, ...] = ()
    prompt_tokens: int = 0


class Create(Protocol):
    """A serving object's one call: the raw body, the caller, the request span -> what it produced."""

    def __call__(self, body: bytes, caller: Caller, span: Span) -> Awaitable[Served]: ...


def traced_handler(operation: str, create: Create, tracing: Tracing, limits: LimitsConfig,
                   replica_id: str = "") -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler of one endpoint: read the body, make the one call, frame what comes back.

    The request's server span (continuing the caller's ``traceparent``) covers the whole
    response, streamed ones included; ``limits.request_timeout_s`` bounds it (504).
    """
    timeout_s = limits.request_timeout_s

    async def handle(request: web.Request) -> web.StreamResponse:
        caller = Caller(tenant_of(request.headers), request.headers.get(ROUTED_MODEL_HEADER),
                        request.headers.get(MODEL_VERSION_HEADER), grant_of(request.headers))
        attributes = {names.GEN_AI_OPERATION_NAME: operation, names.TENANT: caller.tenant,
                      names.REPLICA_ID: replica_id}
        with tracing.request_span(names.http_server_span_name("POST", request.path), request.headers,
                                  attributes) as span:
            deadline = asyncio.get_running_loop().time() + timeout_s
            body = await read_body(request, limits.max_body_bytes)
            served = await before(deadline, timeout_s, create(body, caller, span))
            usage = request.get(USAGE)
            if usage is not None:  # before waiting for the response: a request cut short still reports
                usage.watch(served.streams)
                usage.add(served.prompt_tokens, 0)
            result = served.response
            if inspect.isawaitable(result):
                result = await before(deadline, timeout_s, result)
            return await respond(request, result, deadline, timeout_s)

    return handle
