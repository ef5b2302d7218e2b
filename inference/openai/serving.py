"""What completions and chat share on the way to the engine and back (no HTTP, no torch).

In: parsed requests from the endpoints' ``serving`` modules. Out: engine requests (through
the ``GenerationEngine`` Protocol), the merged output streams of a request's prompts, and
:meth:`GenerationServing.finish`, the one place where every generation response ends (usage
and finish reasons on the request span, the outcome the version's health watch sees).
Engine errors become OpenAI-shaped :class:`RequestError` here, so the routers only frame.

Several models, several versions (#15): :class:`GenerationModels` answers for every served
model. It resolves the model a request names (or the gateway routed it to), leases one of its
versions from the registry (``inference.models.registry``, behind :class:`ModelVersions`) —
the active one, or the one the sidecar picked for a canary — and hands the request to that
version's own :class:`GenerationServing`. The lease is held until the response ends (a
stream's end included), so a request finishes on the version it started on while another
is activated.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np
from opentelemetry.trace import Span

from common.models import MODEL_VERSION_HEADER
from common.replicas import NOT_STARTED_HEADER
from inference.config import FaultConfig
from inference.genai_metrics import GenAIMetrics
from inference.generation import (EngineDeadError, EngineError, EngineNotReadyError, GenerationEngine, GenerationOutput,
                                  GenerationRequest, LogprobRows, QueueFullError, RequestStream)
from inference.models.errors import LifecycleError
from inference.openai.http import Caller, Framed, Result, Served
from inference.openai.preprocess import PreparedPrompt, Preprocessor
from inference.openai.protocol import RequestError, SamplingFields, usage
from inference.tracing import Tracing
from otel import names

T = TypeVar("T")


@dataclass(frozen=True)
class ServedModels:
    """The names this server answers to: its generative models, and the embeddings model when
    one is configured."""

    generation: tuple[str, ...]
    embeddings: str | None = None


# What a version's health watch hears when a response ends: time to first token (None when
# no token came) and the error type (None when it completed).
OutcomeSink = Callable[[float | None, str | None], None]


@dataclass(frozen=True)
class Submitted:
    """A request's prompts, queued on the engine (``n`` choices each)."""

    request_id: str
    created: int
    model: str
    prompt_tokens: int
    streams: tuple[RequestStream, ...]
    n: int = 1
    echoes: tuple[str, ...] = ()
    started: float = 0.0  # time.monotonic() when the request arrived
    metric_attributes: dict[str, str] | None = None

    @property
    def choices(self) -> int:
        return len(self.streams) * self.n


class Stream:
    """The chunks of a streamed response; closing it (even unstarted) cancels its engine requests
    and then calls ``on_close`` (the version lease's release)."""

    def __init__(self, chunks: AsyncIterator[dict[str, Any]], streams: Sequence[RequestStream],
                 on_close: tuple[Callable[[], None], ...] = ()) -> None:
        self._chunks = chunks
        self._streams = streams
        self._on_close = on_close

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._chunks

    def closing(self, callback: Callable[[], None]) -> Stream:
        """The same stream, calling ``callback`` too when it is closed."""
        return Stream(self._chunks, self._streams, (*self._on_close, callback))

    async def aclose(self) -> None:
        try:
            await self._chunks.aclose()  # type: ignore[attr-defined]
        finally:
            for stream in self._streams:
                stream.cancel()
            for callback in self._on_close:
                callback()


class LogprobColumns(NamedTuple):
    """Log-probabilities of a run of tokens as the client sees them, column by column: the token
    strings, their log-probabilities (None: the prompt's first token) and each token's
    alternatives as (string, log-probability) pairs (None: the prompt's first token)."""

    tokens: list[str]
    logprobs: list[float | None]
    top: list[list[tuple[str, float]] | None]


@dataclass
class Choice:
    """One choice of a response as it accumulates; ``delta`` is what arrived with the last output."""

    index: int
    prefix: str = ""
    text: str = ""
    logprobs: list[LogprobRows] | None = None  # one block per output, concatenated when framed
    finish_reason: str | None = None
    started: bool = False
    tokens: int = 0
    delta: str = ""
    delta_logprobs: list[LogprobRows] | None = None
    delta_offset: int = 0


@dataclass
class Outcome:
    """Tallies of one response while it is produced, handed to :meth:`GenerationServing.finish`."""

    choices: list[Choice]
    completion_tokens: int = 0
    first_token: float | None = None  # time.monotonic() of the first output
    error: str | None = None

    @property
    def reasons(self) -> list[str | None]:
        return [c.finish_reason for c in self.choices]

    @property
    def finish_reasons(self) -> list[str]:
        return [r or "stop" for r in self.reasons]


class TokenTexts:
    """Token ids to the strings logprobs show: one decode per id, kept in a list indexed by id
    (the vocabulary bounds it), and the log-probability blocks of a response turned into
    :class:`LogprobColumns` once, when it is framed (numpy for the numbers, one list lookup per
    string)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._strings: list[str | None] = [None] * len(tokenizer)
        self._bytes: dict[str, list[int]] = {}

    def __call__(self, token: int) -> str:
        if token >= len(self._strings):
            self._strings.extend([None] * (token + 1 - len(self._strings)))
        text = self._strings[token]
        if text is None:
            text = self._strings[token] = self._tokenizer.decode([token])
        return text

    def strings(self, ids: list[int]) -> list[str]:
        table = self._strings
        if ids and max(ids) >= len(table):
            table.extend([None] * (max(ids) + 1 - len(table)))
        out = [table[i] for i in ids]
        if any(text is None for text in out):
            out = [self(i) for i in ids]
        return out  # type: ignore[return-value]

    def utf8(self, token: str) -> list[int]:
        """``list(token.encode())`` (chat's ``bytes``), cached by string (shared, never mutated)."""
        cached = self._bytes.get(token)
        if cached is None:
            cached = self._bytes[token] = list(token.encode())
        return cached

    def columns(self, blocks: list[LogprobRows]) -> LogprobColumns:
        """A response's (or a delta's) log-probability blocks as the client sees them."""
        rows = LogprobRows.concat(blocks)
        array, k = rows.array, rows.k
        if len(rows) < 8:  # a streamed delta: plain Python beats numpy's per-call cost on a row or two
            return self._few(array.tolist(), k)
        logprobs = np.maximum(array[:, 1].astype(np.float64), LOGPROB_FLOOR)
        tokens = self.strings(array[:, 0].astype(np.int64).tolist())
        top_ids = array[:, 2 + k:].astype(np.int64)
        top_strings = self.strings(top_ids.ravel().tolist())
        top_values = np.maximum(array[:, 2:2 + k].astype(np.float64), LOGPROB_FLOOR).tolist()
        first = np.isnan(logprobs)  # a prompt's first token: no log-probability, no alternatives
        values: list[float | None] = logprobs.tolist()
        top: list[list[tuple[str, float]] | None] = [
            list(zip(top_strings[i * k:(i + 1) * k], row)) for i, row in enumerate(top_values)]
        if first.any():
            for i in np.flatnonzero(first).tolist():
                values[i] = None
                top[i] = None
        return LogprobColumns(tokens, values, top)

    def _few(self, rows: list[list[float]], k: int) -> LogprobColumns:
        text = self.__call__
        tokens, values, top = [], [], []
        for row in rows:
            tokens.append(text(int(row[0])))
            logprob = row[1]
            if logprob != logprob:  # NaN: a prompt's first token
                values.append(None)
                top.append(None)
            else:
                values.append(max(logprob, LOGPROB_FLOOR))
                top.append([(text(int(t)), max(lp, LOGPROB_FLOOR)) for lp, t in zip(row[2:2 + k], row[2 + k:])])
        return LogprobColumns(tokens, values, top)


LOGPROB_FLOOR = -9999.0
"""JSON has no -Infinity: a token the model rules out gets -9999.0 (as vLLM reports it)."""


class ResponseShapes(Protocol):
    """How one endpoint shapes its objects (``text_completion`` or ``chat.completion``)."""

    def whole(self, submitted: Submitted, choices: list[Choice], usage: dict[str, int],
              texts: TokenTexts) -> dict[str, Any]: ...

    def opening(self, submitted: Submitted) -> list[dict[str, Any]]: ...

    def chunk(self, submitted: Submitted, choice: Choice, texts: TokenTexts) -> dict[str, Any]: ...

    def usage_chunk(self, submitted: Submitted, usage: dict[str, int]) -> dict[str, Any]: ...


class VersionLease(Protocol):
    """One version of a model, held for one request (``inference.models.registry.Lease``)."""

    @property
    def version(self) -> str: ...

    @property
    def serving(self) -> GenerationServing: ...

    def release(self) -> None: ...


class ModelVersions(Protocol):
    """The served models' versions (``inference.models.registry.ModelRegistry``)."""

    def lease(self, model: str, version: str | None = None) -> VersionLease:
        """``version`` of ``model`` (None: the active one); raises a LifecycleError saying why not."""
        ...


class GenerationModels:
    """Every generative model the server serves: the model check, the lease on one of its versions,
    and the hand-off to that version's :class:`GenerationServing` (see the module docstring)."""

    def __init__(self, versions: ModelVersions, models: ServedModels, retry_after_s: int) -> None:
        self._versions = versions
        self._models = models
        self._not_started = not_started(retry_after_s)

    def served_model(self, requested: str, routed: str | None) -> str:
        """The model that serves the request: the one the gateway routed it to when it is ours (the
        policy may degrade a request to a fallback model: Envoy routes it here with the header),
        else the one the body names."""
        if routed is not None and routed in self._models.generation:
            return routed
        self.check_model(requested)
        return requested

    def check_model(self, model: str) -> None:
        if model in self._models.generation:
            return
        if model == self._models.embeddings:
            raise RequestError(400, f"model '{model}' is an embeddings model; use /v1/embeddings", "model")
        raise RequestError(404, f"model '{model}' does not exist", "model", code="model_not_found")

    def lease(self, model: str, version: str | None) -> VersionLease:
        """A version of ``model`` for one request, or the OpenAI error that says why there is none."""
        try:
            return self._versions.lease(model, version)
        except LifecycleError as exc:
            if exc.status == 503:
                raise RequestError(503, str(exc), type="service_unavailable", code="not_ready",
                                   headers=self._not_started) from None
            raise RequestError(exc.status, str(exc), "model", code=exc.code) from None

    async def generate(self, model: str, sampling: SamplingFields,
                       tokenize: Callable[[Preprocessor], list[PreparedPrompt]], *, caller: Caller, span: Span,
                       started: float, operation: str, id_prefix: str, shapes: ResponseShapes) -> Served:
        """A parsed generation request on one version of its model: its engine streams, and the wait for
        its response object or stream with the version that answered in the response headers."""
        served = self.served_model(model, caller.routed_model)
        lease = self.lease(served, caller.model_version)
        headers = {MODEL_VERSION_HEADER: lease.version}
        with _released_on_failure(lease, headers):
            span.set_attribute(names.MODEL_VERSION, lease.version)
            submitted = await lease.serving.generate(model, served, sampling, tokenize, caller=caller, span=span,
                                                     started=started, operation=operation, id_prefix=id_prefix,
                                                     shapes=shapes)
        return Served(_on_version(submitted.response, lease, headers), submitted.streams)


def _with_headers(err: RequestError, headers: Mapping[str, str]) -> RequestError:
    """The error with ``headers`` added (the version that answered)."""
    return RequestError(err.status, err.message, err.param, err.type, err.code, {**err.headers, **headers})


@contextlib.contextmanager
def _released_on_failure(lease: VersionLease, headers: Mapping[str, str]) -> Iterator[None]:
    """Release ``lease`` if the block fails; a refusal leaves with the version's ``headers`` added."""
    try:
        yield
    except RequestError as err:
        lease.release()
        raise _with_headers(err, headers) from None
    except BaseException:
        lease.release()
        raise


async def _on_version(response: Result | Awaitable[Result], lease: VersionLease, headers: Mapping[str, str]) -> Framed:
    """The response framed with the version that answered; the lease is held until it ends (a stream's:
    until the stream is closed)."""
    with _released_on_failure(lease, headers):
        result = await response if inspect.isawaitable(response) else response
    if isinstance(result, Stream):
        return Framed(result.closing(lease.release), headers)
    lease.release()
    return Framed(result, headers)


class GenerationServing:
    """Readiness, preprocessing, submission and stream merging for one version of a generative model."""

    def __init__(self, engine: GenerationEngine, executor: Executor, tracing: Tracing, retry_after_s: int,
                 genai: GenAIMetrics | None = None, *,
                 record: Callable[[Sequence[PreparedPrompt]], None] | None = None,
                 outcomes: OutcomeSink | None = None, faults: FaultConfig | None = None) -> None:
        self._engine = engine
        self._genai = genai or GenAIMetrics()
        self._executor = executor
        self._tracing = tracing
        self._record = record  # recent live prompts, for the shadow run of a new version
        self._outcomes = outcomes  # the version's health watch (automatic rollback)
        self._faults = faults if faults is not None and faults.any else None
        self._not_started = not_started(retry_after_s)
        self._preprocessor: Preprocessor | None = None
        self._texts: TokenTexts | None = None

    @property
    def max_model_len(self) -> int | None:
        info = self._engine.info
        return info.max_model_len if info is not None else None

    def describe(self, span: Span, model: str, sampling: SamplingFields) -> None:
        """The request's GenAI attributes on its span."""
        span.set_attribute(names.GEN_AI_REQUEST_MODEL, model)
        span.set_attribute(names.GEN_AI_REQUEST_TEMPERATURE, sampling.temperature)
        span.set_attribute(names.GEN_AI_REQUEST_TOP_P, sampling.top_p)
        if sampling.max_tokens is not None:
            span.set_attribute(names.GEN_AI_REQUEST_MAX_TOKENS, sampling.max_tokens)
        if sampling.seed is not None:
            span.set_attribute(names.GEN_AI_REQUEST_SEED, sampling.seed)

    def check_ready(self) -> None:
        if not self._engine.ready:
            raise RequestError(503, "model is still loading", type="service_unavailable", code="not_ready",
                               headers=self._not_started)

    async def prepare(self, tokenize: Callable[[Preprocessor], T]) -> T:
        """Run ``tokenize`` on the worker thread, inside a ``preprocess`` span."""
        preprocessor = self._preprocessor_of_model()
        loop = asyncio.get_running_loop()
        with self._tracing.timed_child(names.PREPROCESS_SPAN):  # built on the span thread
            return await loop.run_in_executor(self._executor, tokenize, preprocessor)

    def submit(self, request_id: str, model: str, caller: Caller, span: Span, prompts: Sequence[PreparedPrompt],
               n: int = 1, *, operation: str, started: float, requested_model: str | None = None) -> Submitted:
        """Queue every prompt; if one is refused, cancel those already queued (429/503 for the client)."""
        trace_context = span.get_span_context()
        streams: list[RequestStream] = []
        try:
            for index, prompt in enumerate(prompts):
                streams.append(self._engine.submit(GenerationRequest(
                    request_id=f"{request_id}-{index}", prompt_token_ids=prompt.token_ids, params=prompt.params,
                    tenant=caller.tenant, trace_context=trace_context)))
        except BaseException as exc:
            for stream in streams:
                stream.cancel()
            if isinstance(exc, EngineError):
                raise self._engine_error(exc) from None
            raise
        span.set_attribute(names.GEN_AI_RESPONSE_ID, request_id)
        return Submitted(request_id=request_id, created=int(time.time()), model=model,
                         prompt_tokens=sum(len(p.token_ids) for p in prompts), streams=tuple(streams), n=n,
                         echoes=tuple(p.echo for p in prompts), started=started,
                         metric_attributes=self._genai.attributes(operation, requested_model or model, model,
                                                                  caller.tenant))

    async def merged(self, submitted: Submitted) -> AsyncIterator[tuple[int, GenerationOutput]]:
        """Outputs of the request's prompts as they come, tagged with the prompt's index."""
        try:
            async for item in _merged(submitted.streams):
                yield item
        except EngineDeadError as exc:
            raise RequestError(503, str(exc), type="server_error", code="engine_failed") from None

    async def generate(self, model: str, served: str, sampling: SamplingFields,
                       tokenize: Callable[[Preprocessor], list[PreparedPrompt]], *, caller: Caller, span: Span,
                       started: float, operation: str, id_prefix: str,
                       shapes: ResponseShapes) -> Served:
        """A parsed generation request for ``model`` (served as ``served``), from the readiness check
        to its submitted engine streams and the wait for its response object or stream."""
        self.describe(span, model, sampling)
        span.set_attribute(names.GEN_AI_RESPONSE_MODEL, served)
        self.check_ready()
        prompts = await self.prepare(tokenize)
        if self._record is not None:
            self._record(prompts)
        if self._faults is not None:
            await self._inject(self._faults)
        try:
            submitted = self.submit(f"{id_prefix}-{uuid.uuid4().hex}", served, caller, span, prompts, sampling.n,
                                    operation=operation, started=started, requested_model=model)
        except RequestError as err:
            if err.status >= 500 and self._outcomes is not None:
                self._outcomes(None, str(err.status))
            raise
        return Served(self.respond(span, submitted, shapes, sampling.stream, sampling.include_usage), submitted.streams)

    async def respond(self, span: Span, submitted: Submitted, shapes: ResponseShapes, stream: bool,
                      include_usage: bool) -> dict[str, Any] | Stream:
        """The whole response object, or the stream of its chunks."""
        if stream:
            return Stream(self._chunks(span, submitted, shapes, include_usage), submitted.streams)
        outcome = self._outcome(submitted)
        try:
            async for _ in self._follow(submitted, outcome):
                pass
        except BaseException as exc:
            outcome.error = _error_type(exc)
            raise
        finally:
            self.finish(span, submitted, outcome)
        return shapes.whole(submitted, outcome.choices, usage(submitted.prompt_tokens, outcome.completion_tokens),
                            self._token_texts())

    async def _chunks(self, span: Span, submitted: Submitted, shapes: ResponseShapes,
                      include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        for chunk in shapes.opening(submitted):
            yield chunk
        outcome = self._outcome(submitted)
        texts = self._token_texts()
        try:
            async for choice in self._follow(submitted, outcome):
                if choice.delta or choice.finish_reason or choice.delta_logprobs:
                    yield shapes.chunk(submitted, choice, texts)
        except BaseException as exc:
            outcome.error = _error_type(exc)
            raise
        finally:
            self.finish(span, submitted, outcome)
        if include_usage:
            yield shapes.usage_chunk(submitted, usage(submitted.prompt_tokens, outcome.completion_tokens))

    def _outcome(self, submitted: Submitted) -> Outcome:
        echoes = submitted.echoes or ("",) * len(submitted.streams)
        return Outcome([Choice(index=i, prefix=echoes[i // submitted.n]) for i in range(submitted.choices)])

    async def _follow(self, submitted: Submitted, outcome: Outcome) -> AsyncIterator[Choice]:
        """Fold each engine output into its choice; yield the choice with that output as its delta."""
        async for prompt_index, output in self.merged(submitted):
            if outcome.first_token is None:
                outcome.first_token = time.monotonic()
                if submitted.metric_attributes is not None:
                    self._genai.first_token(submitted.metric_attributes, outcome.first_token - submitted.started)
            choice = outcome.choices[prompt_index * submitted.n + output.index]
            choice.tokens += len(output.token_ids)
            choice.delta_offset = len(choice.prefix) + len(choice.text) if choice.started else 0
            choice.delta = output.text if choice.started else choice.prefix + output.text
            blocks: list[LogprobRows] | None = None  # kept as arrays: strings and JSON when framed
            if output.prompt_logprobs is not None and not choice.started:
                blocks = [output.prompt_logprobs]
            if output.logprobs is not None:
                blocks = (blocks or []) + [output.logprobs]
            choice.delta_logprobs = blocks
            if blocks is not None:
                if choice.logprobs is None:
                    choice.logprobs = []
                choice.logprobs.extend(blocks)
            choice.started = True
            choice.text += output.text
            if output.finished:
                choice.finish_reason = output.finish_reason
                outcome.completion_tokens += output.completion_tokens
            yield choice

    def _token_texts(self) -> TokenTexts:
        if self._texts is None:
            info = self._engine.info
            assert info is not None, "token texts asked for before the engine is ready"
            self._texts = TokenTexts(info.tokenizer)
        return self._texts

    def finish(self, span: Span, submitted: Submitted, outcome: Outcome) -> None:
        """Where every generation response ends, whole or cut short: usage and finish reasons."""
        span.set_attribute(names.GEN_AI_USAGE_INPUT_TOKENS, submitted.prompt_tokens)
        span.set_attribute(names.GEN_AI_USAGE_OUTPUT_TOKENS, outcome.completion_tokens)
        if any(outcome.reasons):
            span.set_attribute(names.GEN_AI_RESPONSE_FINISH_REASONS, outcome.finish_reasons)
        if submitted.metric_attributes is not None:
            now = time.monotonic()
            self._genai.response(submitted.metric_attributes, now - submitted.started, submitted.prompt_tokens,
                                 outcome.completion_tokens,
                                 None if outcome.first_token is None else now - outcome.first_token,
                                 max((c.tokens for c in outcome.choices), default=0), outcome.error)
        if self._outcomes is not None:
            self._outcomes(None if outcome.first_token is None else outcome.first_token - submitted.started,
                           outcome.error)

    async def _inject(self, faults: FaultConfig) -> None:
        """The version's configured faults (``FaultConfig``): a delay, then maybe a 500."""
        if faults.first_token_delay_ms:
            await asyncio.sleep(faults.first_token_delay_ms / 1e3)
        if faults.error_rate and random.random() < faults.error_rate:
            if self._outcomes is not None:
                self._outcomes(None, "500")
            raise RequestError(500, "injected fault (this version's faults.error_rate)", type="server_error",
                               code="injected_fault")

    def _engine_error(self, exc: EngineError) -> RequestError:
        if isinstance(exc, QueueFullError):
            return RequestError(429, f"{exc}; retry later", type="rate_limit_error", code="queue_full",
                                headers=self._not_started)
        if isinstance(exc, EngineNotReadyError):
            return RequestError(503, str(exc), type="service_unavailable", code="not_ready",
                                headers=self._not_started)
        return RequestError(503, str(exc), type="server_error", code="engine_failed", headers=self._not_started)

    def _preprocessor_of_model(self) -> Preprocessor:
        if self._preprocessor is None:
            info = self._engine.info
            assert info is not None, "preprocessor asked for before the engine is ready"
            self._preprocessor = Preprocessor(info.tokenizer, info.max_model_len, info.vocab_size,
                                              info.max_sequences, info.grammars)
        return self._preprocessor


def not_started(retry_after_s: int) -> dict[str, str]:
    """Headers of a refusal answered before any work started: Envoy may retry it on another replica."""
    return {"Retry-After": str(retry_after_s), NOT_STARTED_HEADER: "1"}


def _error_type(exc: BaseException) -> str:
    """``error.type`` of a response that did not complete: the status code, or what cut it short."""
    if isinstance(exc, RequestError):
        return str(exc.status)
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    return type(exc).__qualname__


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
