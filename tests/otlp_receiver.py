"""A minimal OTLP/gRPC collector for tests: receives metrics (and traces), keeps them as OTLP/JSON.

Jaeger v2 stores traces only, so a test that reads the metrics a process exported talks to
this receiver instead: the process exports exactly as it would to an OpenTelemetry
Collector (``opentelemetry.proto.collector.*.v1`` services over gRPC).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.procs import free_port


class OTLPReceiver(metrics_service_pb2_grpc.MetricsServiceServicer, trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._metrics: list[dict[str, Any]] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self._server)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self._server.add_insecure_port(self.endpoint)

    def start(self) -> OTLPReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method name
        if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
            with self._lock:
                self._metrics.append(MessageToDict(request))
            return metrics_service_pb2.ExportMetricsServiceResponse()
        return trace_service_pb2.ExportTraceServiceResponse()

    def metrics(self) -> list[dict[str, Any]]:
        """Every exported metric: ``{"name", "unit", "resource", "points"}``, in arrival order."""
        with self._lock:
            batches = list(self._metrics)
        out = []
        for batch in batches:
            for resource in batch.get("resourceMetrics", []):
                attrs = _attributes(resource.get("resource", {}).get("attributes", []))
                for scope in resource.get("scopeMetrics", []):
                    for metric in scope.get("metrics", []):
                        kind = next(k for k in ("histogram", "sum", "gauge") if k in metric)
                        points = [{**p, "attributes": _attributes(p.get("attributes", []))}
                                  for p in metric[kind].get("dataPoints", [])]
                        out.append({"name": metric["name"], "unit": metric.get("unit", ""), "kind": kind,
                                    "scope": scope.get("scope", {}).get("name"), "resource": attrs,
                                    "points": points})
        return out

    def wait_for(self, ready: Callable[[dict[str, dict[str, Any]]], bool],
                 timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        """The latest export of each metric by name, once ``ready`` says it holds what the test waits for."""
        deadline = time.monotonic() + timeout
        latest: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            latest = {m["name"]: m for m in self.metrics()}
            if ready(latest):
                return latest
            time.sleep(0.2)
        raise AssertionError(f"the expected metrics never arrived; last seen: {sorted(latest)}")


def _attributes(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {item["key"]: next(iter(item["value"].values()), None) for item in items}
