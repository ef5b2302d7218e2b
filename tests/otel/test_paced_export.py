"""otel/paced_export.py: a batch goes out whole and in order, in chunks no heavier than the cap
(a span weighs 1 + its links), and a failed chunk fails the batch without losing the others."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link

from otel.paced_export import PacedSpanExporter, chunks


class Recording(SpanExporter):
    def __init__(self, fail_on: int = -1) -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on
        self.shut = False

    def export(self, spans) -> SpanExportResult:
        self.calls.append([s.name for s in spans])
        return SpanExportResult.FAILURE if len(self.calls) - 1 == self.fail_on else SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.shut = True


def _spans(links_per_span: list[int]):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    anchor = tracer.start_span("anchor")
    anchor.end()
    for i, n in enumerate(links_per_span):
        tracer.start_span(f"s{i}", links=[Link(anchor.get_span_context())] * n).end()
    return exporter.get_finished_spans()[1:]


def test_chunks_keep_order_and_stay_under_the_weight() -> None:
    spans = _spans([0, 0, 16, 0, 16, 16, 40, 0, 0])
    pieces = chunks(spans, 20)
    assert [s.name for piece in pieces for s in piece] == [s.name for s in spans]
    for piece in pieces:
        weight = sum(1 + len(s.links) for s in piece)
        assert weight <= 20 or len(piece) == 1  # a span heavier than the cap goes alone
    assert [len(p) for p in pieces] == [4, 1, 1, 1, 2]
    assert chunks([], 20) == []


def test_paced_exporter_sends_everything_and_reports_a_failed_chunk() -> None:
    spans = _spans([16] * 6)
    inner = Recording()
    paced = PacedSpanExporter(inner, max_weight=34, pause_s=0)
    assert paced.export(spans) == SpanExportResult.SUCCESS
    assert inner.calls == [["s0", "s1"], ["s2", "s3"], ["s4", "s5"]]
    failing = Recording(fail_on=1)
    assert PacedSpanExporter(failing, max_weight=34, pause_s=0).export(spans) == SpanExportResult.FAILURE
    assert len(failing.calls) == 3, "the chunks after a failed one are still sent"
    paced.shutdown()
    assert inner.shut
