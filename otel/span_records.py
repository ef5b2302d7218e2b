"""Finished spans as plain records, for spans whose every field is known when they are made.

In: what a span built after the fact consists of (``engine.step``, ``queue``, ``preprocess``: name,
ids, parent, times, attributes, links), made on the inference server's span thread
(``inference.tracing.Tracing``) when the span export process is on. Out: a :class:`SpanRecord`
(ints, strings, one attributes dict, link tuples), handed to
:class:`~otel.export_process.ProcessSpanExporter` (``send_span``), and in the child the SDK
``ReadableSpan`` it stands for (:func:`readable_span`), exported with the rest.

Why: the SDK span object (sampler, id generator, attribute validation, span processors) and then
flattening it for the export process cost the serving process's GIL ~100 us for an ``engine.step``
span with 16 links (bench/span_export_cost.py); a record is a tuple. Made only under a sampled
parent and when the tracer's sampler (parent-based, step thinning), asked as the SDK asks it, says
it records the span, so the trace is the same; the span id is drawn as the SDK draws one.
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple

from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class SpanRecord(NamedTuple):
    name: str
    trace_id: int
    span_id: int
    parent_span_id: int
    parent_is_remote: bool
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] | None
    links: tuple[tuple[int, int, int], ...] = ()  # (trace id, span id, trace flags)
    scope: str = ""  # the instrumentation scope (tracer) name
    kind: int = SpanKind.INTERNAL.value


def sampled_attributes(tracer: Any, parent: SpanContext, name: str, attributes: dict[str, Any] | None
                       ) -> dict[str, Any] | None:
    """The attributes a span made as a record gets, or None when the tracer's sampler would not record
    it: the same decision the SDK makes when the span is started through ``tracer`` (parent-based
    head sampling, step thinning), from the same inputs."""
    from opentelemetry import trace

    sampler = getattr(tracer, "sampler", None)
    if sampler is None:  # not an SDK tracer: nothing would be recorded
        return None
    result = sampler.should_sample(trace.set_span_in_context(trace.NonRecordingSpan(parent)), parent.trace_id,
                                   name, SpanKind.INTERNAL, attributes)
    if not result.decision.is_sampled():
        return None
    return dict(result.attributes) if result.attributes else {}


def new_span_id() -> int:
    """A span id as the SDK's RandomIdGenerator draws one (never 0, the invalid id)."""
    span_id = random.getrandbits(64)
    while span_id == 0:
        span_id = random.getrandbits(64)
    return span_id


def record_context(trace_id: int, span_id: int) -> SpanContext:
    """The context of a span made as a record (always sampled: made only under a sampled parent)."""
    return SpanContext(trace_id, span_id, is_remote=False, trace_flags=_SAMPLED)


def readable_span(record: SpanRecord, resource: Any, scope: Any) -> Any:
    """The SDK ``ReadableSpan`` a record stands for (in the export process)."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import Link, Status

    return ReadableSpan(
        name=record.name, context=record_context(record.trace_id, record.span_id),
        parent=SpanContext(record.trace_id, record.parent_span_id, record.parent_is_remote, _SAMPLED),
        resource=resource, attributes=record.attributes or {}, kind=SpanKind(record.kind), status=Status(),
        links=[Link(SpanContext(t, s, False, TraceFlags(f))) for t, s, f in record.links],
        start_time=record.start_ns, end_time=record.end_ns, instrumentation_scope=scope)
