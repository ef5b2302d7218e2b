"""Span export in small pieces, so that encoding a batch never holds the GIL for long.

In: the batch span processor's batches (up to 512 spans, every ``export_delay_s``). Out: the
same spans, handed to the real exporter (OTLP gRPC/HTTP/file) in chunks of at most
``max_weight`` (a span weighs 1 + its links: encoding an ``engine.step`` span with 16 links
costs as much as ~8 spans without), with a short sleep between chunks.

Why: the exporters encode a whole batch in Python in one go (~37 us a plain span, ~290 us an
``engine.step`` with 16 links on the development VM), holding the GIL for tens of ms. The
inference engine's thread asks for the GIL back each time its step's device sync returns, and
a thread that holds it keeps it until the switch interval (5 ms) forces a hand-over, so a long
encode stalls the engine a few ms at a time. Chunked, the engine waits at most about one chunk.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

MAX_WEIGHT = 32
PAUSE_S = 0.0002


class PacedSpanExporter(SpanExporter):
    """Wraps an exporter: each batch goes out in chunks of at most ``max_weight``, a pause between."""

    def __init__(self, exporter: SpanExporter, max_weight: int = MAX_WEIGHT, pause_s: float = PAUSE_S) -> None:
        self._exporter = exporter
        self._max_weight = max(1, max_weight)
        self._pause_s = pause_s

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = SpanExportResult.SUCCESS
        for i, chunk in enumerate(chunks(spans, self._max_weight)):
            if i:
                time.sleep(self._pause_s)  # the engine thread takes the GIL here if it waits for it
            if self._exporter.export(chunk) != SpanExportResult.SUCCESS:
                result = SpanExportResult.FAILURE
        return result

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


def chunks(spans: Sequence[ReadableSpan], max_weight: int) -> list[Sequence[ReadableSpan]]:
    """``spans`` in order, cut so that each piece weighs at most ``max_weight`` (a heavier span alone)."""
    out: list[Sequence[ReadableSpan]] = []
    start, weight = 0, 0
    for i, span in enumerate(spans):
        w = 1 + len(span.links)
        if weight and weight + w > max_weight:
            out.append(spans[start:i])
            start, weight = i, 0
        weight += w
    if start < len(spans):
        out.append(spans[start:])
    return out
