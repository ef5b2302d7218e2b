"""Spans: request span continuing traceparent, preprocess/queue children, linked engine.step spans."""

from __future__ import annotations

import aiohttp
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from inference.tracing import TRACER_NAME, Tracing
from otel.config import KernelTraceConfig
from otel.deferred import resolve
from otel.kernels.torch_capture import TorchProfilerCapture
from otel.names import FORWARD_SPAN
from tests.inference.helpers import SlowSteps, kernel_traced_completion, started_engine, tiny_config, wait_until

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


async def test_with_the_export_process_engine_side_spans_leave_as_records_and_make_the_same_tree(
        serve, tmp_path, monkeypatch) -> None:
    """``telemetry.export_process``: ``preprocess``, ``queue`` and ``engine.step`` are handed to the real
    export child as plain records (no SDK span object for them here); the file it writes holds the
    same tree as the in-process path (test above): parents, links, attributes."""
    import os
    import time as _time
    from pathlib import Path

    from otel.config import TelemetryConfig
    from otel.export_process import ProcessSpanExporter
    from otel.otlp_file import read_otlp_file
    from tests.jaeger import parse_otlp

    root = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    path = tmp_path / "spans.otlp"
    child = ProcessSpanExporter(TelemetryConfig(enabled=True, protocol="file", otlp_endpoint=str(path)))
    in_process = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(child))
    provider.add_span_processor(SimpleSpanProcessor(in_process))
    tracing = Tracing(provider.get_tracer(TRACER_NAME), sink=child.send_span)
    observer = SlowSteps()
    engine = started_engine(tiny_config(), observer=observer, tracing=tracing)
    try:
        served = await serve(engine=engine, tracing=tracing)
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{served.url}/v1/completions",
                              json={"model": "tiny-gpt2", "prompt": "trace me", "max_tokens": 4, "seed": 3},
                              headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}) as resp:
                assert resp.status == 200
                body = await resp.json()
            async with s.post(f"{served.url}/v1/completions",  # refused in preprocess: an error span
                              json={"model": "tiny-gpt2", "prompt": "x" * 5000, "max_tokens": 4},
                              headers={"traceparent": f"00-{'1' * 32}-{PARENT_ID}-01"}) as resp:
                refused = resp.status
        await wait_until(lambda: len(observer.finished) >= 4)
    finally:
        engine.shutdown(10)
    assert child.force_flush()
    here = {s.name for s in in_process.get_finished_spans()}
    assert "engine.step" not in here and "queue" not in here, here
    traces = parse_otlp(*read_otlp_file(path))
    child.shutdown()
    trace = traces[TRACE_ID]
    request = trace.one("POST /v1/completions")
    assert request.parent_id == PARENT_ID and request.kind == "server"
    assert {s.name for s in trace.children(request)} >= {"preprocess", "queue", "engine.step"}
    for name in ("preprocess", "queue"):
        child_span = trace.one(name)
        assert child_span.parent_id == request.span_id and child_span.kind == "internal"
        assert request.start_ns <= child_span.start_ns <= child_span.end_ns <= request.end_ns
    assert trace.one("queue").attributes["kernelgate.queue.slot"] >= 0
    steps = sorted(trace.named("engine.step"), key=lambda s: s.start_ns)
    assert len(steps) == body["usage"]["completion_tokens"]
    assert steps[0].attributes["kernelgate.step.phase"] == "prefill"
    for step in steps:
        assert step.parent_id == request.span_id and step.attributes["kernelgate.step.batch_size"] == 1
        assert step.attributes["gen_ai.request.model"] == "tiny-gpt2"
        assert [link.span_id for link in step.links] == [request.span_id]
    assert [format(resolve(span).span_id, "016x") for _, span in observer.finished][-len(steps):] == \
        [s.span_id for s in steps], "the forward observer resolves the step spans the child exported"
    assert refused == 400  # the prompt is refused while it is prepared: recorded on preprocess, as before
    [pre] = traces["1" * 32].named("preprocess")
    assert pre.status_code == 2  # ERROR, built through the SDK (with its exception event)


async def test_decode_passes_of_one_shape_are_recorded_once_then_derived_inside_their_step(serve) -> None:
    """The real engine and runner on CPU with the real kernel tracer (torch's profiler recording CPU
    operators): the runner names each decode step's fixed work (on CPU: the eager decode of one
    shape, ``decode_key``) and times it when asked; the first captured pass of a key is recorded,
    later ones are derived from it, every kernel span inside its ``gpu.forward`` and that inside
    its ``engine.step``."""
    config = KernelTraceConfig(ratio=1.0, steps_per_request=8, max_captures_per_minute=1000,
                               max_spans_per_trace=100_000, stall_budget_pct=0, activities="cpu", capture="torch")
    spans, kernels = await kernel_traced_completion(serve, tiny_config(), config, TorchProfilerCapture("cpu"), 24)
    by_id = {s.context.span_id: s for s in spans}
    forwards = sorted((s for s in spans if s.name == FORWARD_SPAN), key=lambda s: s.start_time)
    source = [(f.attributes["kernelgate.step.phase"], f.attributes["kernelgate.kernels.source"]) for f in forwards]
    assert source[:2] == [("prefill", "recorded"), ("decode", "recorded")], source
    derived = [f for f in forwards if f.attributes["kernelgate.kernels.source"] == "derived"]
    assert derived, "later decode passes of the same shape are derived"
    assert kernels.stats.captures == 2 and kernels.stats.derived == len(derived) == len(forwards) - 2
    recorded = forwards[1]
    for forward in derived:
        a = forward.attributes
        assert a["kernelgate.kernels.graph_key"] == recorded.attributes["kernelgate.kernels.graph_key"]
        assert a["kernelgate.kernels.derived_from.step_index"] == recorded.attributes["kernelgate.step.index"]
        assert [link.context.span_id for link in forward.links] == [recorded.context.span_id]
        assert a["kernelgate.kernels.count"] > 0 and a["kernelgate.kernels.replay_ns"] > 0
    for forward in forwards:
        step = by_id[forward.parent.span_id]
        assert step.name == "engine.step" and step.attributes["kernelgate.step.index"] == \
            forward.attributes["kernelgate.step.index"]
        assert step.start_time <= forward.start_time <= forward.end_time <= step.end_time
        children = [s for s in spans if s.parent is not None and s.parent.span_id == forward.context.span_id]
        assert children and all(forward.start_time <= k.start_time <= k.end_time <= forward.end_time
                                for k in children)
        marked = {k.attributes.get("kernelgate.kernel.derived", False) for k in children}
        assert marked == {forward.attributes["kernelgate.kernels.source"] == "derived"}
    # Derived operators are the recorded decode's own, in its order (its forward pass, not the sampling after it).
    names_of = [k.name for k in sorted((s for s in spans if s.parent is not None
                                        and s.parent.span_id == derived[0].context.span_id),
                                       key=lambda k: k.start_time)]
    assert "aten::addmm" in names_of or "aten::linear" in names_of or "aten::mm" in names_of, names_of
