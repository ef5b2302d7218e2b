"""otel/deferred.py: the producer only queues; spans are built in order on the span thread; a
pending span resolves to its context; flush waits for what was queued; a failing build loses its
span, not the thread. And through inference.tracing.Tracing: the engine.step span (links,
attributes, parent, thinning) is built off the calling thread, identical to before."""

from __future__ import annotations

import threading
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanContext, TraceFlags

from inference.tracing import StepInfo, Tracing
from otel import names
from otel.deferred import DeferredSpans, PendingSpan, resolve
from otel.sampling import StepThinningSampler


def _ctx(span_id: int) -> SpanContext:
    return SpanContext(trace_id=7, span_id=span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def test_submit_returns_before_the_build_and_the_context_resolves_after_it() -> None:
    spans = DeferredSpans(interval_s=0.001)
    gate = threading.Event()
    built_on: list[str] = []

    def build(record: int) -> SpanContext:
        gate.wait(5)
        built_on.append(threading.current_thread().name)
        return _ctx(record)

    pending = spans.submit(build, 42)
    assert isinstance(pending, PendingSpan) and not pending.built
    assert pending.context(timeout=0.05) is None  # not built yet: the waiter goes on without it
    gate.set()
    assert resolve(pending).span_id == 42
    assert built_on == ["kernelgate-spans"]
    assert resolve(_ctx(3)).span_id == 3 and resolve(None) is None
    spans.close()


def test_spans_are_built_in_order_flush_waits_and_a_failing_build_is_contained() -> None:
    spans = DeferredSpans(interval_s=0.001)
    built: list[int] = []

    def build(record: int) -> SpanContext | None:
        if record == 5:
            raise ValueError("bad record")
        built.append(record)
        return _ctx(record + 1)

    pendings = [spans.submit(build, i) for i in range(50)]
    assert spans.flush(5)
    assert built == [i for i in range(50) if i != 5]
    assert all(p.built for p in pendings)
    assert pendings[5].context() is None and spans.failures == 1
    assert [p.context().span_id for p in pendings[:3]] == [1, 2, 3]
    spans.close()
    assert spans.submit(build, 60).context().span_id == 61  # a submit after close starts it again
    spans.close()
    assert DeferredSpans().flush(0.1)  # never started: nothing to wait for


def test_step_spans_are_built_off_the_engine_thread_as_before() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=StepThinningSampler(ParentBased(ALWAYS_ON), decode_every=2))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    started_on: list[str] = []

    class Recorded(SimpleSpanProcessor):
        def on_start(self, span, parent_context=None) -> None:
            started_on.append(threading.current_thread().name)

    provider.add_span_processor(Recorded(InMemorySpanExporter()))
    tracing = Tracing(provider.get_tracer(names.INFERENCE_TRACER))
    with tracing.request_span("POST /v1/completions", {}, {}) as first, \
            tracing.request_span("POST /v1/completions", {}, {}) as second:
        contexts = (first.get_span_context(), second.get_span_context())
        started_on.clear()
        now = time.time_ns()
        tracing.record_child(names.QUEUE_SPAN, contexts[0], now - 10, now, {names.QUEUE_SLOT: 0})
        pendings = []
        for index, phase in enumerate(["prefill", "decode", "decode"]):
            step = StepInfo(index, phase, 2, 2, ("a", "b"), now + index, contexts, (1, 1))
            pendings.append(tracing.record_step(step, now + index + 1, contexts, {names.GEN_AI_REQUEST_MODEL: "m"}))
        assert tracing.flush(5)
    tracing.close()
    assert set(started_on) == {"kernelgate-spans"}, "engine-side spans start on the span thread only"
    spans = exporter.get_finished_spans()
    [queue] = [s for s in spans if s.name == names.QUEUE_SPAN]
    assert queue.parent.span_id == contexts[0].span_id and queue.attributes[names.QUEUE_SLOT] == 0
    assert (queue.start_time, queue.end_time) == (now - 10, now)
    steps = [s for s in spans if s.name == names.STEP_SPAN]
    assert [s.attributes[names.STEP_INDEX] for s in steps] == [0, 2], "decode step 1 thinned"
    for span in steps:
        assert span.parent.span_id == contexts[0].span_id
        assert [link.context.span_id for link in span.links] == [c.span_id for c in contexts]
        assert span.attributes[names.STEP_BATCH_SIZE] == 2 and span.attributes[names.GEN_AI_REQUEST_MODEL] == "m"
        assert span.end_time - span.start_time == 1
    resolved = [resolve(p) for p in pendings]
    assert [c.span_id for c in resolved[::2]] == [s.context.span_id for s in steps]
    assert [c.trace_flags.sampled for c in resolved] == [True, False, True]  # the thinned one: not recorded
    provider.shutdown()
