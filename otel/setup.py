"""Telemetry set-up, in one place: tracer and meter providers, sampler, exporters, propagators, resource.

Instrumented code only calls ``opentelemetry.trace.get_tracer(...)`` / ``metrics.get_meter(...)``
and starts spans or records measurements; when telemetry is disabled those are no-ops.
Metrics go where traces go (the same OTLP endpoint and protocol).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from common.version import __version__
from otel import names
from otel.config import TelemetryConfig

# The span export process of this process's tracer provider, while one is installed: the kernel
# tracer hands it its passes as compact records (otel/kernels/emit.py).
_export_process: Any = None

# Downward-API environment variables (k8s/) -> resource attributes.
_ENV_RESOURCE = {"POD_NAME": "k8s.pod.name", "POD_NAMESPACE": "k8s.namespace.name", "NODE_NAME": "k8s.node.name"}


def build_resource(config: TelemetryConfig, service_name: str):
    from opentelemetry.sdk.resources import Resource

    attrs = {"service.name": service_name, "service.version": __version__}
    for env, key in _ENV_RESOURCE.items():
        if os.environ.get(env):
            attrs[key] = os.environ[env]
    attrs.update(config.resource_attributes)
    return Resource.create(attrs)


@contextlib.contextmanager
def configure_tracing(config: TelemetryConfig | None, service_name: str) -> Iterator[object | None]:
    """Install the SDK tracer provider for this process; flush and shut it down on exit."""
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()]))
    if config is None or not config.enabled:
        yield None
        return
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from otel.sampling import StepThinningSampler

    global _export_process
    resource = build_resource(config, service_name)
    if config.export_process:  # encoding and sending in a process of its own (otel/export_process.py)
        from otel.export_process import ProcessSpanExporter

        exporter: Any = ProcessSpanExporter(config, resource)
        _export_process = exporter
    else:
        exporter = build_span_exporter(config)
        if config.export_chunk_weight:
            from otel.paced_export import PacedSpanExporter

            exporter = PacedSpanExporter(exporter, config.export_chunk_weight)
    sampler = StepThinningSampler(ParentBased(TraceIdRatioBased(config.sampling_ratio)), config.decode_step_spans_every)
    provider = TracerProvider(resource=resource, sampler=sampler)
    # Batched and off the request path: a full queue drops spans, never blocks a request.
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=config.max_queue_size,
                                                   schedule_delay_millis=config.export_delay_s * 1000,
                                                   export_timeout_millis=int(config.export_timeout_s * 1000)))
    trace.set_tracer_provider(provider)
    try:
        yield provider
    finally:
        provider.shutdown()
        _export_process = None


def build_span_exporter(config: TelemetryConfig) -> Any:
    """The OTLP span exporter ``telemetry.protocol`` names (in this process, or in the export process)."""
    if config.protocol == "file":
        from otel.otlp_file import OTLPFileExporter

        return OTLPFileExporter(config.otlp_endpoint)
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=True, timeout=config.export_timeout_s)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPSpanExporter

    endpoint = config.otlp_endpoint.rstrip("/")
    return HTTPSpanExporter(endpoint=endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces",
                            timeout=config.export_timeout_s)


@contextlib.contextmanager
def configure_metrics(config: TelemetryConfig | None, service_name: str) -> Iterator[object | None]:
    """Install the SDK meter provider for this process (OTLP, every ``metrics_interval_s``); flush on exit."""
    if config is None or not config.enabled or config.metrics_interval_s == 0:
        yield None
        return
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    if config.protocol == "file":
        from otel.otlp_file import OTLPFileMetricExporter

        exporter = OTLPFileMetricExporter(metrics_path(config.otlp_endpoint))
    elif config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter(endpoint=config.otlp_endpoint, insecure=True, timeout=config.export_timeout_s)
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HTTPMetricExporter

        endpoint = config.otlp_endpoint.rstrip("/").removesuffix("/v1/traces")
        exporter = HTTPMetricExporter(endpoint=endpoint + "/v1/metrics", timeout=config.export_timeout_s)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=config.metrics_interval_s * 1000,
                                           export_timeout_millis=config.export_timeout_s * 1000)
    provider = MeterProvider(resource=build_resource(config, service_name), metric_readers=[reader])
    metrics.set_meter_provider(provider)
    try:
        yield provider
    finally:
        provider.shutdown()


def metrics_path(traces_path: str) -> str:
    """Where the file protocol writes metrics: beside the traces (``x.jsonl`` -> ``x.metrics.jsonl``)."""
    stem, dot, ext = traces_path.rpartition(".")
    return f"{stem}.metrics.{ext}" if dot and "/" not in ext else traces_path + ".metrics"


def export_process_sink() -> Any:
    """Where spans made as plain records go (``otel.span_records``): the span export process of the
    installed tracer provider, or None (telemetry off, or spans exported in this process)."""
    return _export_process.send_span if _export_process is not None else None


@contextlib.contextmanager
def kernel_tracing(config: TelemetryConfig | None) -> Iterator[object | None]:
    """The kernel tracer (otel/kernels/) of this process, or None when tracing or capture is off.

    Enter it inside ``configure_tracing``: its worker exports what is pending before the
    provider shuts down.
    """
    if config is None or not config.enabled or not config.kernels.enabled:
        yield None
        return
    from otel.kernels.factory import make_capture
    from otel.kernels.tracer import KernelTracer

    sink = _export_process.send_forward if _export_process is not None else None
    tracer = KernelTracer(config.kernels, trace.get_tracer(names.KERNELS_TRACER), make_capture(config.kernels),
                          sink=sink)
    try:
        yield tracer
    finally:
        tracer.close()
