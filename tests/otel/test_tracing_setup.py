"""otel/setup.py in a fresh process (a tracer provider is set once per process): exporter,
sampler, propagators and resource, read back through the OTLP file exporter (both formats)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from otel.otlp_file import read_otlp_file
from tests.jaeger import parse_otlp
from tests.procs import ROOT

SCRIPT = r"""
import sys
from opentelemetry import propagate, trace
from otel.config import KernelTraceConfig, TelemetryConfig
from otel.setup import configure_tracing, kernel_tracing

config = TelemetryConfig(enabled=True, protocol="file", otlp_endpoint=sys.argv[1], sampling_ratio=0.0,
                         export_delay_s=0.05, resource_attributes={"deployment.environment": "test"},
                         kernels=KernelTraceConfig(activities="cpu"))
with configure_tracing(config, "svc-under-test"), kernel_tracing(config) as kernels:
    print(type(kernels).__name__)
    tracer = trace.get_tracer("t")
    with tracer.start_as_current_span("dropped-root"):
        pass
    parent = propagate.extract({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    with tracer.start_as_current_span("server", context=parent, kind=trace.SpanKind.SERVER) as server:
        with tracer.start_as_current_span("child", links=[trace.Link(server.get_span_context())]):
            carrier = {}
            propagate.inject(carrier)
            print(carrier["traceparent"])
with kernel_tracing(TelemetryConfig(enabled=False)) as none:
    print(none)
"""


@pytest.mark.parametrize("name", ["spans.jsonl", "spans.otlp"])
def test_configure_tracing_exports_sampled_spans_with_resource_and_propagation(tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"POD_NAME": "kg-0", "POD_NAMESPACE": "ml", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[0] == "KernelTracer" and lines[2] == "None"
    traceparent = lines[1]
    assert traceparent.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-") and traceparent.endswith("-01")

    payloads = list(read_otlp_file(out))
    traces = parse_otlp(*payloads)
    # sampling_ratio 0 drops new roots; a sampled caller's trace is continued (parent-based)
    assert list(traces) == ["4bf92f3577b34da6a3ce929d0e0e4736"]
    trace = traces["4bf92f3577b34da6a3ce929d0e0e4736"]
    server, child = trace.one("server"), trace.one("child")
    assert server.parent_id == "00f067aa0ba902b7" and server.kind == "server"
    assert trace.parent(child) == server and traceparent.split("-")[2] == child.span_id
    assert [(link.trace_id, link.span_id) for link in child.links] == [(trace.trace_id, server.span_id)]
    assert server.service == "svc-under-test"
    resource = {a["key"]: a["value"]["stringValue"] for a in payloads[0]["resourceSpans"][0]["resource"]["attributes"]
                if "stringValue" in a["value"]}
    assert resource["k8s.pod.name"] == "kg-0" and resource["k8s.namespace.name"] == "ml"
    assert resource["deployment.environment"] == "test" and resource["service.version"]
    assert json.dumps(payloads[0]).count("dropped-root") == 0
