"""OTLP on disk: traces (and metrics) where no collector can be reached (benchmarks, air-gapped nodes).

A path ending in ``.json``/``.jsonl`` gets OTLP/JSON lines, one ``{"resourceSpans": [...]}``
object per export (hex ids, integer enums: what the OpenTelemetry collector's file exporter
writes and its ``otlpjsonfile`` receiver replays, e.g. into Jaeger). Any other path gets
binary ``ExportTraceServiceRequest`` messages, each after its length (4 bytes, big-endian):
the same encoding work as the OTLP/gRPC exporter, so a benchmark measures what production pays.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

_ID_KEYS = ("traceId", "spanId", "parentSpanId")
_LENGTH = struct.Struct(">I")


def is_json_path(path: str | Path) -> bool:
    return str(path).endswith((".json", ".jsonl"))


def _hex_ids(node: Any) -> Any:
    """protobuf's JSON mapping writes bytes as base64; OTLP/JSON wants hex trace and span ids."""
    if isinstance(node, dict):
        return {k: (base64.b64decode(v).hex() if k in _ID_KEYS and isinstance(v, str) else _hex_ids(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_hex_ids(v) for v in node]
    return node


def _to_json(message: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return _hex_ids(MessageToDict(message, use_integers_for_enums=True))


class _OTLPFile:
    """One OTLP export request per write: a JSON line, or length-prefixed protobuf (by extension)."""

    def __init__(self, path: str | Path) -> None:
        self._lock = threading.Lock()
        self._json = is_json_path(path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a" if self._json else "ab")  # noqa: SIM115 - closed in close()

    def write(self, request: Any) -> bool:
        if self._json:
            data: str | bytes = json.dumps(_to_json(request), separators=(",", ":")) + "\n"
        else:
            body = request.SerializeToString()
            data = _LENGTH.pack(len(body)) + body
        with self._lock:
            if self._file.closed:
                return False
            self._file.write(data)
            self._file.flush()
        return True

    def close(self) -> None:
        with self._lock:
            self._file.close()


class OTLPFileExporter(SpanExporter):
    """Appends each batch of spans to ``path`` (OTLP/JSON line or length-prefixed protobuf, by extension)."""

    def __init__(self, path: str | Path) -> None:
        self._file = _OTLPFile(path)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        return SpanExportResult.SUCCESS if self._file.write(encode_spans(spans)) else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._file.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class OTLPFileMetricExporter(MetricExporter):
    """Metrics as :class:`OTLPFileExporter` writes spans, one export request per batch."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self._file = _OTLPFile(path)

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

        ok = self._file.write(encode_metrics(metrics_data))
        return MetricExportResult.SUCCESS if ok else MetricExportResult.FAILURE

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._file.close()


def read_otlp_file(path: str | Path) -> Iterator[dict[str, Any]]:
    """Each exported batch as an OTLP/JSON ``{"resourceSpans": [...]}`` object, whichever the format."""
    if is_json_path(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)
        return
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    with open(path, "rb") as fh:
        while header := fh.read(_LENGTH.size):
            (size,) = _LENGTH.unpack(header)
            yield _to_json(ExportTraceServiceRequest.FromString(fh.read(size)))
