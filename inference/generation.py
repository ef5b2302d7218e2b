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


@dataclass(frozen=True)
class Spent:
    """What the engine did for one request, counted when it let the request go (finished,
    aborted, failed): prompt tokens prefilled (0 if it never got a slot) and tokens generated,
    including any the client never received."""

    prompt_tokens: int
    completion_tokens: int


class RequestStream:
    """Async iterator over one request's outputs; ``cancel()`` frees its batch slot.

    ``spent()`` waits for the engine's final count, which arrives however the request ends.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.loop = loop
        self.finished = False
        self._queue: asyncio.Queue[GenerationOutput | BaseException] = asyncio.Queue()
        self._abort = abort
        self._spent: Spent | None = None
        self._spent_event = asyncio.Event()

    def set_spent(self, spent: Spent) -> None:
        """Called on the loop (the engine uses call_soon_threadsafe); the first count wins."""
        if self._spent is None:
            self._spent = spent
            self._spent_event.set()

    async def spent(self, timeout_s: float) -> Spent | None:
        """The engine's final count, or None if it did not come within ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._spent_event.wait()
        except TimeoutError:
            return None
        return self._spent

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
