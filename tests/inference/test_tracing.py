"""Spans: request span continuing traceparent, preprocess/queue children, linked engine.step spans."""

from __future__ import annotations

import aiohttp
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from inference.tracing import TRACER_NAME, Tracing
from otel.deferred import resolve
from tests.inference.helpers import SlowSteps, started_engine, tiny_config, wait_until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


async def test_request_and_step_spans(serve) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider.get_tracer(TRACER_NAME))
    observer = SlowSteps()
    engine = started_engine(tiny_config(), observer=observer, tracing=tracing)
    try:
        served = await serve(engine=engine, tracing=tracing)
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{served.url}/v1/completions",
                              json={"model": "tiny-gpt2", "prompt": "trace me", "max_tokens": 4, "temperature": 0.5,
                                    "seed": 3},
                              headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
                                       "x-kernelgate-tenant": "acme"}) as resp:
                assert resp.status == 200
                body = await resp.json()
        await wait_until(lambda: len(observer.finished) >= 4)
    finally:
        engine.shutdown(10)
    spans = exporter.get_finished_spans()
    [request] = [s for s in spans if s.name == "POST /v1/completions"]
    assert request.kind == SpanKind.SERVER
    assert format(request.context.trace_id, "032x") == TRACE_ID
    assert format(request.parent.span_id, "016x") == PARENT_ID
    attrs = request.attributes
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["gen_ai.request.model"] == "tiny-gpt2"
    assert attrs["gen_ai.request.max_tokens"] == 4
    assert attrs["gen_ai.request.temperature"] == 0.5
    assert attrs["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"]
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == (body["choices"][0]["finish_reason"],)
    assert attrs["kernelgate.tenant"] == "acme"

    children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == request.context.span_id}
    assert {"preprocess", "queue"} <= set(children)
    queue = children["queue"]
    assert queue.start_time <= queue.end_time
    assert request.start_time <= queue.start_time and queue.end_time <= request.end_time

    steps = [s for s in spans if s.name == "engine.step"]
    assert len(steps) == body["usage"]["completion_tokens"]
    assert steps[0].attributes["kernelgate.step.phase"] == "prefill"
    for step in steps:
        assert step.parent.span_id == request.context.span_id  # in the request's trace (first sampled request)
        assert step.attributes["kernelgate.step.batch_size"] == 1
        assert [link.context.span_id for link in step.links] == [request.context.span_id]
        assert step.start_time <= step.end_time
    # The forward observer got each step's span, whose context resolves (off the engine thread) once built.
    assert [resolve(span).span_id for _, span in observer.finished][-len(steps):] == [
        s.context.span_id for s in steps]
