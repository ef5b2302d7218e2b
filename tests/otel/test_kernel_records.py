"""A captured pass as one compact record (otel/kernels/emit.py): built into the same spans in this
process (through the tracer) and in the span export process (``telemetry.export_process``), where
the kernel tracer hands it over instead of creating SDK spans. Real child process, real OTLP file
exporter, read back as the benchmark and the e2e tests read spans."""

from __future__ import annotations

import os
import time
from pathlib import Path

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind

from otel import names
from otel.config import KernelTraceConfig, TelemetryConfig
from otel.export_process import ProcessSpanExporter
from otel.kernels.cupti_capture import CuptiCapture
from otel.kernels.emit import ForwardRecord, emit_with_tracer, readable_spans
from otel.kernels.tracer import KernelTracer
from otel.otlp_file import read_otlp_file
from otel.span_records import SpanRecord
from tests.jaeger import parse_otlp
from tests.otel.fake_cupti import FakeCupti, fake_demangle
from tests.otel.test_kernel_derive import Replaying, wait_until

ROOT = Path(__file__).resolve().parents[2]

RECORD = ForwardRecord(
    trace_id=0xABC, span_id=0, parent_span_id=0x12, parent_is_remote=False, start_ns=1000, end_ns=1900,
    attributes={names.STEP_INDEX: 5, names.KERNELS_SOURCE: "derived", names.KERNELS_GRAPH_KEY: "0,16,256"},
    links=((0xDEF, 0x34, 1), (0xABC, 0x56, 1)),
    kernels=(("at::native::gemm", 1100, 1300, "void at::native::gemm<float>(int)", 0, 7, 1, 200),
             ("layer_norm", 1300, 1800, "layer_norm", 0, 7, 12, 400)),
    derived=True)


def _fields(span) -> tuple:
    return (span.name, span.kind, span.start_time, span.end_time, dict(span.attributes),
            [(li.context.trace_id, li.context.span_id) for li in span.links], span.context.trace_id)


def test_a_record_becomes_the_same_spans_through_the_tracer_and_in_the_export_process() -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    forward_ctx = emit_with_tracer(provider.get_tracer(names.KERNELS_TRACER), RECORD, pause=lambda: None)
    here = list(memory.get_finished_spans())
    there = readable_spans(RECORD._replace(span_id=77), Resource({}), InstrumentationScope(names.KERNELS_TRACER))

    assert [_fields(a) for a in here] == [_fields(b) for b in there]
    forward_here, forward_there = here[-1], there[-1]
    assert forward_here.context.span_id == forward_ctx.span_id and forward_there.context.span_id == 77
    assert (forward_here.parent.span_id, forward_there.parent.span_id) == (0x12, 0x12)
    assert all(k.parent.span_id == forward_here.context.span_id for k in here[:-1])
    assert all(k.parent.span_id == 77 and k.context.span_id not in (0, 77) for k in there[:-1])
    assert len({k.context.span_id for k in there}) == len(there)
    folded = there[1].attributes
    assert folded[names.KERNEL_FOLDED] is True and folded[names.KERNEL_DERIVED] is True
    assert folded[names.KERNEL_COUNT] == 12 and there[0].kind == SpanKind.INTERNAL


def test_kernel_spans_go_to_the_export_process_as_records_and_come_out_as_the_same_tree(
        tmp_path: Path, monkeypatch) -> None:
    """The deriving tracer on the fake CUPTI, its passes handed to the real export child: no SDK span
    per kernel in this process, and in the file the same tree the in-process path makes."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    path = tmp_path / "spans.otlp"
    resource = Resource({"service.name": "kernelgate-inference"})
    exporter = ProcessSpanExporter(TelemetryConfig(enabled=True, protocol="file", otlp_endpoint=str(path)), resource)
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    in_process = InMemorySpanExporter()  # every SDK span this process ends
    provider.add_span_processor(SimpleSpanProcessor(in_process))

    cupti = FakeCupti()
    capture = CuptiCapture(cupti, demangle=fake_demangle, prepare_ahead=True)
    tracer = KernelTracer(KernelTraceConfig(ratio=1.0, stall_budget_pct=0, steps_per_request=3),
                          provider.get_tracer(names.KERNELS_TRACER), capture, sink=exporter.send_forward)
    engine = Replaying(tracer, cupti)
    request = provider.get_tracer("api").start_span("POST /v1/completions", kind=SpanKind.SERVER)
    assert tracer.on_request(request, {}) == "ratio"
    engine.step(1, request)  # asks for the recorder
    wait_until(capture.ready)
    engine.step(2, request)  # recorded
    wait_until(lambda: tracer.stats.templates == 1)
    engine.step(3, request)  # derived
    engine.step(4, request)  # derived
    tracer.close()
    tracer.on_request_end(request, time.time_ns())
    assert exporter.force_flush()
    assert [s.name for s in in_process.get_finished_spans()] == ["POST /v1/completions"], \
        "kernel and forward spans are built in the export process, not here"

    [trace] = parse_otlp(*read_otlp_file(path)).values()
    provider.shutdown()
    req = trace.one("POST /v1/completions")
    forwards = sorted(trace.named(names.FORWARD_SPAN), key=lambda s: s.start_ns)
    assert [f.attributes[names.STEP_INDEX] for f in forwards] == [2, 3, 4]
    recorded, *derived = forwards
    assert [f.attributes[names.KERNELS_SOURCE] for f in forwards] == ["recorded", "derived", "derived"]
    assert tracer.stats.exported_spans == sum(1 + f.attributes[names.KERNELS_SPANS] for f in forwards)
    assert tracer.stats.exported_spans == len(trace.spans) - 1 and exporter.dropped == 0
    for forward in forwards:
        assert forward.parent_id == req.span_id and forward.kind == "internal"
        assert forward.service == "kernelgate-inference"
        kernels = trace.children(forward)
        assert len(kernels) == forward.attributes[names.KERNELS_SPANS] > 0
        assert all(forward.start_ns <= k.start_ns <= k.end_ns <= forward.end_ns for k in kernels)
        assert all(k.attributes[names.GPU_KERNEL_NAME] for k in kernels)
        marks = {k.attributes.get(names.KERNEL_DERIVED) for k in kernels}
        assert marks == ({True} if forward in derived else {None})
    for forward in derived:
        assert forward.attributes[names.KERNELS_DERIVED_FROM_STEP] == 2
        assert [link.span_id for link in forward.links] == [recorded.span_id]
        assert [k.name for k in sorted(trace.children(forward), key=lambda k: k.start_ns)] == \
            ["at::native::gemm", "layer_norm", "at::native::gemm"]
    exporter.shutdown()


def test_a_gone_export_process_loses_records_and_spans_without_blocking_or_raising(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    exporter = ProcessSpanExporter(TelemetryConfig(enabled=True, protocol="file",
                                                   otlp_endpoint=str(tmp_path / "spans.otlp")))
    exporter._proc.kill()
    exporter._proc.wait()
    exporter.send_forward(RECORD._replace(span_id=9))  # buffered: 3 spans
    exporter.send_span(SpanRecord("queue", 0xABC, 5, 0x12, False, 1, 2, None))
    assert exporter.write_records() is False and exporter.dropped == 4, "the gone child is found, nothing raises"
    exporter.send_forward(RECORD._replace(span_id=9))  # known gone: counted at once
    assert exporter.dropped == 7
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.get_tracer("api").start_span("POST /v1/completions").end()  # serving goes on
    assert exporter.dropped == 8
    assert exporter.force_flush(timeout_millis=1000) is False
    exporter.shutdown()
    provider.shutdown()


def test_an_export_process_that_stops_reading_does_not_hang_flush_or_shutdown(tmp_path: Path, monkeypatch) -> None:
    import signal

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    exporter = ProcessSpanExporter(TelemetryConfig(enabled=True, protocol="file",
                                                   otlp_endpoint=str(tmp_path / "spans.otlp")), exit_timeout_s=1.0)
    os.kill(exporter._proc.pid, signal.SIGSTOP)  # alive, reads nothing
    try:
        assert exporter.force_flush(timeout_millis=200) is False
    finally:
        exporter.shutdown()  # does not wait for a child that cannot exit: killed
    assert exporter._proc.poll() is not None
    exporter.send_forward(RECORD._replace(span_id=9))  # after shutdown: dropped, counted
    assert exporter.dropped == 3 and exporter.write_records()


def test_records_are_made_only_for_spans_the_tracers_sampler_records() -> None:
    """The record path asks the tracer's sampler as the SDK would: step thinning holds even for a
    ``Tracing`` not told the rule, and an unsampled parent makes nothing."""
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace import SpanContext, TraceFlags

    from inference.tracing import StepInfo, Tracing
    from otel.sampling import StepThinningSampler

    records: list = []
    provider = TracerProvider(sampler=StepThinningSampler(ParentBased(TraceIdRatioBased(1.0)), 16))
    tracing = Tracing(provider.get_tracer("kernelgate.inference"), sink=records.append)  # decode_step_spans_every=1
    sampled = SpanContext(0xA, 0x1, False, TraceFlags(1))
    unsampled = SpanContext(0xB, 0x2, False, TraceFlags(0))
    for index in range(32):
        step = StepInfo(index, "prefill" if index == 5 else "decode", 1, 1, ("r",), 10, (sampled,), (1,))
        tracing.record_step(step, 20, [sampled], {})
    tracing.record_step(StepInfo(99, "prefill", 1, 1, ("r",), 10, (unsampled,), (1,)), 20, [unsampled], {})
    tracing.record_child(names.QUEUE_SPAN, sampled, 1, 2, {names.QUEUE_SLOT: 3})
    tracing.record_child(names.QUEUE_SPAN, unsampled, 1, 2, {names.QUEUE_SLOT: 4})
    assert tracing.flush()
    steps = [r for r in records if r.name == names.STEP_SPAN]
    assert sorted(r.attributes[names.STEP_INDEX] for r in steps) == [0, 5, 16]  # decode 0 and 16, the prefill
    assert all(r.trace_id == 0xA and r.parent_span_id == 0x1 and r.links == ((0xA, 0x1, 1),) for r in steps)
    [queue] = [r for r in records if r.name == names.QUEUE_SPAN]
    assert queue.attributes == {names.QUEUE_SLOT: 3} and queue.trace_id == 0xA
    tracing.close()
