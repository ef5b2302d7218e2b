"""Span export in a child process (otel/export_process.py, ``telemetry.export_process``): the server
only flattens spans; the child rebuilds them and exports them with the configured exporter. Real
SDK spans, the real child process, the real OTLP file exporter (read back with the reader the
benchmark uses); Jaeger through it: tests/e2e/test_tracing.py."""

from __future__ import annotations

import os
from pathlib import Path

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from otel.config import TelemetryConfig
from otel.export_process import ProcessSpanExporter, flatten, rebuild
from otel.otlp_file import read_otlp_file
from tests.jaeger import parse_otlp

ROOT = Path(__file__).resolve().parents[2]


def some_spans() -> list:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "kernelgate-inference", "k8s.pod.name": "p"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("kernelgate.inference", "1.2")
    with tracer.start_as_current_span("POST /v1/completions", kind=SpanKind.SERVER,
                                      attributes={"gen_ai.request.max_tokens": 4, "kernelgate.tenant": "acme"}) as req:
        req.add_event("first token", {"n": 1})
        req.set_status(Status(StatusCode.ERROR, "boom"))
        step = tracer.start_span("engine.step", links=[Link(req.get_span_context(), {"why": "batch"})],
                                 attributes={"kernelgate.step.phase": "prefill", "x": [1, 2]}, start_time=10)
        step.end(end_time=20)
    provider.shutdown()
    return list(memory.get_finished_spans())


def test_flattened_spans_come_back_the_same() -> None:
    spans = some_spans()
    back = rebuild(*flatten(spans))
    for a, b in zip(spans, back):
        assert (a.name, a.context.trace_id, a.context.span_id, a.kind, a.start_time, a.end_time) == \
            (b.name, b.context.trace_id, b.context.span_id, b.kind, b.start_time, b.end_time)
        assert dict(a.attributes) == dict(b.attributes)
        assert (a.parent.span_id if a.parent else None) == (b.parent.span_id if b.parent else None)
        assert [(li.context.span_id, dict(li.attributes)) for li in a.links] == \
            [(li.context.span_id, dict(li.attributes)) for li in b.links]
        assert [(e.name, e.timestamp, dict(e.attributes)) for e in a.events] == \
            [(e.name, e.timestamp, dict(e.attributes)) for e in b.events]
        assert (a.status.status_code, a.status.description) == (b.status.status_code, b.status.description)
        assert dict(a.resource.attributes) == dict(b.resource.attributes)
        assert (a.instrumentation_scope.name, a.instrumentation_scope.version) == \
            (b.instrumentation_scope.name, b.instrumentation_scope.version)


def test_the_child_process_exports_through_the_configured_exporter(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    path = tmp_path / "spans.otlp"
    exporter = ProcessSpanExporter(TelemetryConfig(enabled=True, protocol="file", otlp_endpoint=str(path)))
    spans = some_spans()
    assert exporter.export(spans).name == "SUCCESS"
    assert exporter.force_flush()
    traces = parse_otlp(*read_otlp_file(path))
    [trace] = traces.values()
    step, request = trace.one("engine.step"), trace.one("POST /v1/completions")
    assert request.attributes["kernelgate.tenant"] == "acme" and request.kind == "server"
    assert step.attributes["kernelgate.step.phase"] == "prefill"
    assert [(link.span_id, link.attributes) for link in step.links] == [(request.span_id, {"why": "batch"})]
    assert (step.start_ns, step.end_ns) == (10, 20)
    assert exporter.export(spans).name == "SUCCESS"
    exporter.shutdown()  # the child exports what it has, then exits
    assert len(parse_otlp(*read_otlp_file(path))[trace.trace_id].named("engine.step")) == 2
    assert exporter.export(spans).name == "FAILURE" and exporter.dropped == 2, "a gone child loses spans, no raise"
