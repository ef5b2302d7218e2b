"""What flows between the serving layer and the engine: plain data, no torch, no HTTP.

The serving layer turns an OpenAI request into :class:`GenerationRequest` objects; the
engine answers each with a stream of :class:`GenerationOutput` deltas.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class Guide:
    """Constrained decoding: the llguidance grammar every token must keep valid (JSON schema or any JSON)."""

    kind: Literal["json_object", "json_schema"]
    grammar: str  # llguidance's serialized grammar (validated by the preprocessor)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters; ``temperature == 0`` means greedy.

    ``n`` sequences share one prefill of the prompt. ``logprobs`` (None: off) asks for the
    log-probability of every sampled token under the model (log-softmax of the raw logits,
    before penalties, bias, grammar, temperature and top-p) and the ``logprobs`` most likely
    alternatives; ``prompt_logprobs`` the same for the prompt's tokens (echo). Penalties are
    OpenAI's: ``logit -= frequency * count + presence * (count > 0)`` over generated tokens.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    guide: Guide | None = None


TokenLogprobs = tuple[int, float | None, tuple[tuple[int, float], ...]]
"""A token id, its log-probability (None: a prompt's first token), and the most likely (id,
log-probability) pairs at that position."""


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
    """What one engine step produced for one sequence of a request: new text since its previous output.

    ``index`` is the sequence (0..n-1); ``logprobs`` has one entry per token in ``token_ids``
    when asked for; the first output of a sequence carries ``prompt_logprobs`` when asked for
    (the prompt's first token has no log-probability: None).
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finished: bool = False
    finish_reason: FinishReason | None = None
    index: int = 0
    logprobs: tuple[TokenLogprobs, ...] | None = None
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None


@dataclass(frozen=True)
class Spent:
    """What the engine did for one request, counted when it let the request go (finished,
    aborted, failed): prompt tokens prefilled (0 if it never got a slot) and tokens generated,
    including any the client never received."""

    prompt_tokens: int
    completion_tokens: int


class RequestStream:
    """Async iterator over one request's outputs (all ``n`` sequences); ``cancel()`` frees its slots.

    ``spent()`` waits for the engine's final count, which arrives however the request ends.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, abort: Callable[[str], None],
                 sequences: int = 1) -> None:
        self.request_id = request_id
        self.loop = loop
        self.finished = False
        self._open = sequences
        self._queue: asyncio.Queue[GenerationOutput | BaseException] = asyncio.Queue()
        self._abort = abort
        self._spent: Spent | None = None
        self._unreported = sequences
        self._spent_event = asyncio.Event()

    def set_spent(self, spent: Spent) -> None:
        """Called on the loop (the engine uses call_soon_threadsafe), once for each of the request's
        sequences as the engine lets it go. The count is complete when every sequence has reported:
        the prompt is prefilled once (the ``n`` sequences share it), generated tokens add up."""
        if self._spent_event.is_set():
            return
        if self._spent is None:
            self._spent = spent
        else:
            self._spent = Spent(max(self._spent.prompt_tokens, spent.prompt_tokens),
                                self._spent.completion_tokens + spent.completion_tokens)
        self._unreported -= 1
        if self._unreported <= 0:
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
            self._open -= 1
            self.finished = self._open == 0
        return item


@dataclass(frozen=True)
class ModelInfo:
    """What the serving layer may know of the loaded model."""

    name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    tokenizer: Any
    backend: str
    device: str
    max_sequences: int = 1  # the batch size: the most sequences (``n``) one request may ask for
    grammars: Any = None  # inference.structured.Grammars for this tokenizer (None: no constrained decoding)


@dataclass(frozen=True)
class EngineStats:
    """How many requests wait for a slot and hold one, and how many steps ran."""

    waiting: int
    running: int
    steps: int


class GenerationEngine(Protocol):
    """All the serving layer and the health endpoints use of the engine."""

    @property
    def ready(self) -> bool:
        """Loaded, warmed up, not failed and not shutting down."""
        ...

    @property
    def failure(self) -> BaseException | None:
        """Why the engine thread died (None while it is healthy)."""
        ...

    @property
    def info(self) -> ModelInfo | None:
        """The loaded model (None until ready)."""
        ...

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; raises QueueFullError, EngineNotReadyError or EngineDeadError."""
        ...

    def stats(self) -> EngineStats:
        """The queue and the batch right now (the replica's load report)."""
        ...


class EngineError(Exception):
    """Base of the errors the engine reports to the serving layer."""


class QueueFullError(EngineError):
    """The waiting queue is at its bound; the client should retry later."""


class EngineNotReadyError(EngineError):
    """The model is not loaded (yet), or the engine is shutting down."""


class EngineDeadError(EngineError):
    """The engine thread failed; the server must be restarted."""
