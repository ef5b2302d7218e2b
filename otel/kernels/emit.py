"""One captured pass's spans as one compact record, and the two ways it becomes spans.

In: what the kernel tracer's worker decided for a pass (the ``gpu.forward`` span's parent, links,
attributes and window, and the planned kernel spans). Out: a :class:`ForwardRecord`: plain ints,
strings, one attributes dict for ``gpu.forward`` and one tuple per kernel span. It becomes spans
either

* in this process, through the OpenTelemetry tracer (:func:`emit_with_tracer`: SDK span objects,
  the sampler, the batch span processor, encoding in this process), or
* in the span export process (``telemetry.export_process``, otel/export_process.py): the worker
  hands the record to :class:`~otel.export_process.ProcessSpanExporter` (one pickled frame per
  pass), and the child builds the same spans (:func:`readable_spans`) and exports them. The serving
  process then creates no span object per kernel at all: on the H200 the worker spent ~80-100 us
  of GIL per kernel span building SDK spans, and their OTLP encoding came on top.

Both give the same spans: names, kind, parents, links, attributes, times. Only the ids differ in
origin: in the export process ``gpu.forward``'s span id is drawn here (the worker needs it as the
kernel spans' parent and as the link a derived pass points to) and the kernel spans' ids in the
child. The compact path is taken only under a sampled parent (a kernel-traced request always is
one: it must be head-sampled), where the SDK's parent-based sampler would record it anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags

from otel import names
from otel.kernels.capture import YIELD_EVERY_SPANS, yield_gil
from otel.kernels.plan import KernelSpan
from otel.span_records import new_span_id, record_context

# (short name, start ns, end ns, full kernel name, device, stream, count, gpu time ns)
KernelTuple = tuple[str, int, int, str, int, int, int, int]


class ForwardRecord(NamedTuple):
    """A ``gpu.forward`` span and its kernel spans, as plain data (picklable, no SDK objects)."""

    trace_id: int
    span_id: int  # 0: not drawn yet (the SDK draws it in this process)
    parent_span_id: int
    parent_is_remote: bool
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: tuple[tuple[int, int, int], ...]  # (trace id, span id, trace flags)
    kernels: tuple[KernelTuple, ...]
    derived: bool  # every kernel span carries kernelgate.kernel.derived: true


def kernel_tuples(spans: Sequence[KernelSpan]) -> tuple[KernelTuple, ...]:
    return tuple((k.name, k.start_ns, k.end_ns, k.kernel_name[:1024], k.device, k.stream, k.count, k.gpu_time_ns)
                 for k in spans)


def kernel_attributes(k: KernelTuple, derived: bool) -> dict[str, Any]:
    """A kernel span's attributes (the same in both paths)."""
    attributes: dict[str, Any] = {names.GPU_KERNEL_NAME: k[3], names.GPU_DEVICE: k[4], names.GPU_STREAM: k[5],
                                  names.KERNEL_COUNT: k[6], names.KERNEL_GPU_TIME_NS: k[7]}
    if k[6] > 1:
        attributes[names.KERNEL_FOLDED] = True
    if derived:
        attributes[names.KERNEL_DERIVED] = True
    return attributes


def forward_context(record: ForwardRecord) -> SpanContext:
    """The ``gpu.forward`` span's context, for a record whose span id is drawn (the compact path)."""
    return record_context(record.trace_id, record.span_id)


def emit_with_tracer(tracer: trace.Tracer, record: ForwardRecord,
                     pause: Callable[[], None] = yield_gil) -> SpanContext:
    """The record's spans through ``tracer`` (this process); returns ``gpu.forward``'s context."""
    parent = SpanContext(record.trace_id, record.parent_span_id, is_remote=record.parent_is_remote,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    links = [Link(SpanContext(t, s, is_remote=False, trace_flags=TraceFlags(f))) for t, s, f in record.links]
    forward = tracer.start_span(names.FORWARD_SPAN, context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
                                kind=SpanKind.INTERNAL, start_time=record.start_ns, links=links,
                                attributes=record.attributes)
    ctx = trace.set_span_in_context(forward)
    for i, k in enumerate(record.kernels):
        if i % YIELD_EVERY_SPANS == YIELD_EVERY_SPANS - 1:
            pause()
        tracer.start_span(k[0], context=ctx, kind=SpanKind.INTERNAL, start_time=k[1],
                          attributes=kernel_attributes(k, record.derived)).end(end_time=k[2])
    forward.end(end_time=record.end_ns)
    return forward.get_span_context()


def readable_spans(record: ForwardRecord, resource: Any, scope: Any) -> list[Any]:
    """The record's spans as SDK ``ReadableSpan`` objects (in the export process), ``gpu.forward`` last
    (the order the tracer ends them in)."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import Status

    sampled = TraceFlags(TraceFlags.SAMPLED)
    forward = forward_context(record)
    spans = [ReadableSpan(name=k[0], context=SpanContext(record.trace_id, new_span_id(), False, sampled),
                          parent=forward, resource=resource, attributes=kernel_attributes(k, record.derived),
                          kind=SpanKind.INTERNAL, status=Status(), start_time=k[1], end_time=k[2],
                          instrumentation_scope=scope)
             for k in record.kernels]
    spans.append(ReadableSpan(
        name=names.FORWARD_SPAN, context=forward,
        parent=SpanContext(record.trace_id, record.parent_span_id, record.parent_is_remote, sampled),
        resource=resource, attributes=record.attributes, kind=SpanKind.INTERNAL, status=Status(),
        links=[Link(SpanContext(t, s, False, TraceFlags(f))) for t, s, f in record.links],
        start_time=record.start_ns, end_time=record.end_ns, instrumentation_scope=scope))
    return spans
