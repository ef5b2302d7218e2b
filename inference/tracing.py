"""Trace spans of the inference server, through the OpenTelemetry API only.

The tracer is obtained here, once, and passed to the API layer and the engine inside a
:class:`Tracing` object. Whoever installs an SDK (another issue) gets: a server span per
request that continues the caller's W3C ``traceparent``; ``preprocess`` and ``queue``
child spans; and one ``engine.step`` span per forward pass, linked to the span of every
request in that batch. Engine-side spans are created after the fact from recorded
timestamps, so nothing is added to the forward pass itself; and they are built on a thread of
their own (``otel.deferred``): the engine thread only queues an immutable record per span. With
the span export process (``telemetry.export_process``) that thread does not make SDK spans of
them either: it hands plain records to the export process (``otel.span_records``).

:class:`ForwardObserver` is the hook for kernel-level tracing (``otel/kernels/``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

from otel import names
from otel.deferred import DeferredSpans, PendingSpan
from otel.sampling import step_kept
from otel.setup import export_process_sink
from otel.span_records import SpanRecord, new_span_id, record_context, sampled_attributes

TRACER_NAME = names.INFERENCE_TRACER

StepPhase = Literal["prefill", "decode"]


@dataclass(frozen=True)
class StepInfo:
    """One engine forward pass, as a forward observer sees it."""

    index: int
    phase: StepPhase
    batch_size: int
    num_tokens: int
    request_ids: tuple[str, ...]
    start_time_ns: int
    # Span contexts of the requests' server spans, aligned with request_ids (kernel capture finds its requests).
    trace_contexts: tuple[SpanContext | None, ...] = ()
    # Tokens each sequence put through this pass, aligned with request_ids (prompt length in a
    # prefill, 0 for a sequence that copies another's prefill, 1 in a decode): how a pass's GPU
    # time is divided among its requests.
    tokens_per_sequence: tuple[int, ...] = ()
    # The fixed work a decode step runs (inference.runner.ModelRunner.decode_key: the CUDA graph it
    # replays), None for a prefill or an eager GPU pass; set only when a forward observer listens.
    graph_key: tuple[int, ...] | None = None
    # On the step handed to ``finish`` when ``start`` asked for it: the runner's timing of that work
    # (inference.runner.DecodeTiming), None otherwise.
    replay: Any = None


def step_attributes(step: StepInfo) -> dict[str, Any]:
    """The attributes of a step's ``engine.step`` span (``otel.sampling.StepThinningSampler`` reads two)."""
    return {names.STEP_PHASE: step.phase, names.STEP_INDEX: step.index, names.STEP_BATCH_SIZE: step.batch_size,
            names.STEP_NUM_TOKENS: step.num_tokens}


class ForwardObserver(Protocol):
    """Called by the engine thread around every forward pass (prefill or decode step).

    ``start(step)`` runs right before the forward pass is launched; when it returns True and the
    step has a ``graph_key``, the engine has the runner time that work and the step given to
    ``finish`` carries it as ``replay``. ``finish(step, span)`` runs right after the step's sampled tokens are on the host (so the GPU work
    of the step is complete). ``span`` is the ``engine.step`` span still being built
    (``otel.deferred.resolve(span)`` gives its SpanContext, None when tracing is off; resolve
    it off the engine thread), so captured kernels can be attached to it. Both run on the
    engine thread: keep them cheap, and never raise (errors are logged and ignored).
    """

    def start(self, step: StepInfo) -> bool | None: ...

    def finish(self, step: StepInfo, span: PendingSpan | SpanContext | None) -> None: ...

    def idle(self) -> bool:
        """True while no step needs watching (nothing selected waits for a pass, none is being
        captured): the engine may then pipeline decode steps, so ``start`` of step N+1 comes before
        ``finish`` of step N, and an idle observer must ignore both. False: one step at a time."""
        ...


class RequestObserver(Protocol):
    """Told of each request span (e.g. ``otel.kernels.KernelTracer``, which selects requests to profile)."""

    def on_request(self, span: trace.Span, headers: Mapping[str, str]) -> object: ...

    def on_request_end(self, span: trace.Span, end_ns: int) -> bool:
        """The request is done at ``end_ns``; True: the observer ends ``span`` (with that end time) once
        it has added what it still measures about the request, False: the caller ends it now."""
        ...


class Tracing:
    """Creates this server's spans; wraps the single tracer."""

    def __init__(self, tracer: trace.Tracer | None = None, request_observer: RequestObserver | None = None,
                 decode_step_spans_every: int = 1, sink: Callable[[SpanRecord], object] | None = None) -> None:
        # Where spans built after the fact go as plain records instead of SDK spans (otel/span_records.py):
        # the span export process of the global tracer provider (telemetry.export_process), unless a
        # tracer of its own is given.
        if sink is None and tracer is None:
            sink = export_process_sink()
        self._sink = sink
        self.tracer = tracer or trace.get_tracer(TRACER_NAME)
        self._request_observer = request_observer
        # The sampler's step thinning (telemetry.decode_step_spans_every), applied before a step span
        # is queued: a thinned step costs the span thread nothing (otel.sampling.step_kept).
        self._decode_every = decode_step_spans_every
        # Engine-side spans (engine.step, queue) are built on a thread of their own.
        self._deferred = DeferredSpans()
        self._build_step = self._build_step_span
        self._build_child = self._build_child_span

    @contextmanager
    def request_span(self, name: str, headers: Mapping[str, str],
                     attributes: Mapping[str, Any]) -> Iterator[trace.Span]:
        """Server span continuing the caller's ``traceparent``; current inside the block."""
        parent = propagate.extract(headers)
        with self.tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER,
                                               attributes=dict(attributes), record_exception=False,
                                               set_status_on_exception=False, end_on_exit=False) as span:
            if self._request_observer is not None:
                self._request_observer.on_request(span, headers)
            try:
                yield span
            except Exception as exc:
                # Client errors (4xx) leave a server span's status unset; only 5xx are errors.
                status = getattr(exc, "status", 500)
                span.set_attribute(names.HTTP_RESPONSE_STATUS_CODE, status)
                if status >= 500:
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise
            finally:
                # A kernel-traced request's span stays open (its end time fixed) until its GPU share is on it.
                end_ns = time.time_ns()
                observer = self._request_observer
                if observer is None or not observer.on_request_end(span, end_ns):
                    span.end(end_time=end_ns)

    @contextmanager
    def child_span(self, name: str) -> Iterator[trace.Span]:
        with self.tracer.start_as_current_span(name) as span:
            yield span

    @contextmanager
    def timed_child(self, name: str) -> Iterator[None]:
        """A child of the current span covering the block, built after it on the span thread (the
        block sees no span of its own). An exception leaving the block is recorded on it and sets its
        status, as ``child_span`` does."""
        parent = trace.get_current_span().get_span_context()
        start_ns = time.time_ns()
        error: Exception | None = None
        try:
            yield
        except Exception as exc:
            error = exc
            raise
        finally:
            self.record_child(name, parent, start_ns, time.time_ns(), error=error)

    def record_child(self, name: str, parent: SpanContext | None, start_ns: int, end_ns: int,
                     attributes: Mapping[str, Any] | None = None, error: Exception | None = None) -> None:
        """A finished span under ``parent``, from recorded wall-clock timestamps (built on the span thread)."""
        if parent is None or not parent.is_valid:
            return
        self._deferred.submit(self._build_child, (name, parent, start_ns, end_ns, attributes, error))

    def record_step(self, step: StepInfo, end_ns: int, request_contexts: Sequence[SpanContext | None],
                    attributes: Mapping[str, Any]) -> PendingSpan | None:
        """The ``engine.step`` span of a finished forward pass, linked to its requests' spans; its
        step attributes (the ones the step-thinning sampler reads) come from ``step``.

        The engine thread only queues an immutable record (``step`` is frozen); the span is built on
        the span thread (otel/deferred.py), where the sampler decides. The returned
        :class:`PendingSpan` gives its ``SpanContext`` once built (None when not recorded).

        It belongs to the trace of the batch's first head-sampled request (so that request's
        trace shows its steps, and a step is recorded exactly when one of its requests is);
        the other requests reach it through their link. A step none of whose requests is traced
        (telemetry off: their contexts are invalid), or that step thinning drops, records nothing
        and returns None.
        """
        if not step_kept(step.phase, step.index, self._decode_every):
            return None  # thinned: the sampler would drop it
        if not any(c is not None and c.is_valid for c in request_contexts):
            return None
        return self._deferred.submit(self._build_step, (step, end_ns, tuple(request_contexts), attributes))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every span recorded so far is built (call before the tracer provider shuts down)."""
        return self._deferred.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Build what is recorded, then stop the span thread."""
        self._deferred.close(timeout)

    # -- the span thread ----------------------------------------------------------------------------
    def _build_child_span(self, record: tuple[str, SpanContext, int, int, Mapping[str, Any] | None,
                                              Exception | None]) -> None:
        name, parent, start_ns, end_ns, attributes, error = record
        if self._sink is not None and parent.trace_flags.sampled and error is None:
            kept = sampled_attributes(self.tracer, parent, name, dict(attributes) if attributes else None)
            if kept is not None:
                self._sink(SpanRecord(name, parent.trace_id, new_span_id(), parent.span_id, parent.is_remote,
                                      start_ns, end_ns, kept or None, scope=TRACER_NAME))
            return
        ctx = trace.set_span_in_context(trace.NonRecordingSpan(parent))
        span = self.tracer.start_span(name, context=ctx, start_time=start_ns, attributes=attributes)
        if error is not None and span.is_recording():
            span.record_exception(error, timestamp=end_ns)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end(end_time=end_ns)

    def _build_step_span(self, record: tuple[StepInfo, int, tuple[SpanContext | None, ...], Mapping[str, Any]]
                         ) -> SpanContext | None:
        step, end_ns, request_contexts, attributes = record
        valid = [c for c in request_contexts if c is not None and c.is_valid]
        owner = next((c for c in valid if c.trace_flags.sampled), valid[0] if valid else None)
        if self._sink is not None and owner is not None and owner.trace_flags.sampled:
            kept = sampled_attributes(self.tracer, owner, names.STEP_SPAN, {**step_attributes(step), **attributes})
            if kept is None:  # thinned by the sampler (when this Tracing was not told the rule)
                return None
            span_id = new_span_id()
            self._sink(SpanRecord(names.STEP_SPAN, owner.trace_id, span_id, owner.span_id, owner.is_remote,
                                  step.start_time_ns, end_ns, kept,
                                  tuple((c.trace_id, c.span_id, int(c.trace_flags)) for c in valid),
                                  scope=TRACER_NAME))
            return record_context(owner.trace_id, span_id)
        parent = trace.set_span_in_context(trace.NonRecordingSpan(owner)) if owner else otel_context.Context()
        span = self.tracer.start_span(names.STEP_SPAN, context=parent, start_time=step.start_time_ns,
                                      attributes={**step_attributes(step), **attributes})
        # Linked once recorded: most steps are thinned out (otel/sampling.py, which decides by
        # phase and index, not links), and building a batch's links cost them ~2/3 of their time.
        if span.is_recording():
            for context in valid:
                span.add_link(context)
        span.end(end_time=end_ns)
        span_context = span.get_span_context()
        return span_context if span_context.is_valid else None
