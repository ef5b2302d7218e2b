"""OpenAI completions and chat completions on top of the engine (no HTTP, no torch).

Turns a parsed request into engine requests (preprocessing on a worker thread, under a
``preprocess`` span), and the engine's output streams into OpenAI response objects or
stream chunks. Leaving an output generator early (client gone, timeout) cancels every
engine request it started, which frees their batch slots.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from opentelemetry.trace import Span

from inference import protocol
from inference.generation import GenerationOutput, GenerationRequest, RequestStream
from inference.preprocess import PreparedPrompt, Preprocessor
from inference.tracing import Tracing
from otel import names

Kind = Literal["completion", "chat"]


class ModelInfoLike(Protocol):
    name: str
    max_model_len: int
    vocab_size: int
    tokenizer: Any


class GenerationEngine(Protocol):
    """What serving needs of the engine."""

    @property
    def ready(self) -> bool: ...

    @property
    def info(self) -> ModelInfoLike | None: ...

    def submit(self, request: GenerationRequest) -> RequestStream: ...


@dataclass
class RequestContext:
    """Identity and bookkeeping of one HTTP request being served."""

    request_id: str
    model: str
    tenant: str
    span: Span
    created: int = field(default_factory=lambda: int(time.time()))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)


class GenerationService:
    """Serves completions and chat for the one generative model."""

    def __init__(self, engine: GenerationEngine, executor: Executor, tracing: Tracing) -> None:
        self._engine = engine
        self._executor = executor
        self._tracing = tracing
        self._preprocessor: Preprocessor | None = None

    @property
    def engine(self) -> GenerationEngine:
        return self._engine

    def preprocessor(self) -> Preprocessor:
        if self._preprocessor is None:
            info = self._engine.info
            assert info is not None, "preprocessor asked for before the engine is ready"
            self._preprocessor = Preprocessor(info.tokenizer, info.max_model_len, info.vocab_size)
        return self._preprocessor

    async def prepare(self, request: protocol.CompletionRequest | protocol.ChatCompletionRequest) -> list[PreparedPrompt]:
        """Tokenize and validate on the worker thread, inside a ``preprocess`` span."""
        preprocessor = self.preprocessor()
        loop = asyncio.get_running_loop()
        with self._tracing.child_span(names.PREPROCESS_SPAN):
            if isinstance(request, protocol.ChatCompletionRequest):
                return [await loop.run_in_executor(self._executor, preprocessor.chat, request)]
            return await loop.run_in_executor(self._executor, preprocessor.completion, request)

    def submit(self, ctx: RequestContext, prompts: list[PreparedPrompt]) -> list[RequestStream]:
        """Queue every prompt; if one is refused, cancel those already queued and re-raise."""
        trace_context = ctx.span.get_span_context()
        streams: list[RequestStream] = []
        try:
            for index, prompt in enumerate(prompts):
                streams.append(self._engine.submit(GenerationRequest(
                    request_id=f"{ctx.request_id}-{index}", prompt_token_ids=prompt.token_ids, params=prompt.params,
                    tenant=ctx.tenant, trace_context=trace_context)))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        ctx.prompt_tokens = sum(len(p.token_ids) for p in prompts)
        return streams

    async def complete(self, kind: Kind, ctx: RequestContext, streams: list[RequestStream]) -> dict[str, Any]:
        """The whole (non-streamed) response object."""
        texts = [""] * len(streams)
        reasons: list[str | None] = [None] * len(streams)
        async for index, output in _merged(streams):
            texts[index] += output.text
            if output.finished:
                reasons[index] = output.finish_reason
                ctx.completion_tokens += output.completion_tokens
        ctx.finish_reasons = [r or "stop" for r in reasons]
        usage = protocol.usage(ctx.prompt_tokens, ctx.completion_tokens)
        if kind == "chat":
            choices = [protocol.chat_choice(i, t, r) for i, (t, r) in enumerate(zip(texts, ctx.finish_reasons))]
            return protocol.chat_object(ctx.request_id, ctx.created, ctx.model, choices, usage, chunk=False)
        choices = [protocol.completion_choice(i, t, r) for i, (t, r) in enumerate(zip(texts, ctx.finish_reasons))]
        return protocol.completion_object(ctx.request_id, ctx.created, ctx.model, choices, usage)

    async def stream(self, kind: Kind, ctx: RequestContext, streams: list[RequestStream],
                     include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        """Stream chunks (the SSE framing and the final ``[DONE]`` are the HTTP layer's)."""
        if kind == "chat":
            first = [protocol.chat_delta_choice(i, {"role": "assistant", "content": ""}, None)
                     for i in range(len(streams))]
            yield protocol.chat_object(ctx.request_id, ctx.created, ctx.model, first, None, chunk=True)
        reasons: list[str | None] = [None] * len(streams)
        async for index, output in _merged(streams):
            if output.finished:
                reasons[index] = output.finish_reason
                ctx.completion_tokens += output.completion_tokens
            if not output.text and not output.finished:
                continue
            yield self._chunk(kind, ctx, index, output)
        ctx.finish_reasons = [r or "stop" for r in reasons]
        if include_usage:
            usage = protocol.usage(ctx.prompt_tokens, ctx.completion_tokens)
            if kind == "chat":
                yield protocol.chat_object(ctx.request_id, ctx.created, ctx.model, [], usage, chunk=True)
            else:
                yield protocol.completion_object(ctx.request_id, ctx.created, ctx.model, [], usage)

    def _chunk(self, kind: Kind, ctx: RequestContext, index: int, output: GenerationOutput) -> dict[str, Any]:
        if kind == "chat":
            delta = {"content": output.text} if output.text else {}
            choice = protocol.chat_delta_choice(index, delta, output.finish_reason)
            return protocol.chat_object(ctx.request_id, ctx.created, ctx.model, [choice], None, chunk=True)
        choice = protocol.completion_choice(index, output.text, output.finish_reason)
        return protocol.completion_object(ctx.request_id, ctx.created, ctx.model, [choice], None)


async def _merged(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, GenerationOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index; cancels all on exit."""
    try:
        if len(streams) == 1:
            async for output in streams[0]:
                yield 0, output
            return
        queue: asyncio.Queue[tuple[int, GenerationOutput | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for output in stream:
                    await queue.put((index, output))
            except Exception as exc:  # noqa: BLE001 - forwarded to the consumer
                await queue.put((index, exc))
            await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
    finally:
        for stream in streams:
            stream.cancel()
