"""What flows between the serving layer and the engine: plain data, no torch, no HTTP.

The serving layer turns an OpenAI request into :class:`GenerationRequest` objects; the
engine answers each with a stream of :class:`GenerationOutput` deltas.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters; ``temperature == 0`` means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete. ``trace_context`` is the OpenTelemetry SpanContext of the request span."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    tenant: str = ""
    trace_context: Any = None


@dataclass(frozen=True)
class GenerationOutput:
    """What one engine step produced for one request: new text since the previous output."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finished: bool = False
    finish_reason: FinishReason | None = None


class RequestStream:
    """Async iterator over one request's outputs; ``cancel()`` frees its batch slot."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.loop = loop
        self.finished = False
        self._queue: asyncio.Queue[GenerationOutput | BaseException] = asyncio.Queue()
        self._abort = abort

    def put(self, item: GenerationOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def cancel(self) -> None:
        if not self.finished:
            self.finished = True
            self._abort(self.request_id)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> GenerationOutput:
        if self.finished and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item


class EngineError(Exception):
    """Base of the errors the engine reports to the serving layer."""


class QueueFullError(EngineError):
    """The waiting queue is at its bound; the client should retry later."""


class EngineNotReadyError(EngineError):
    """The model is not loaded (yet), or the engine is shutting down."""


class EngineDeadError(EngineError):
    """The engine thread failed; the server must be restarted."""
