"""otel/names.py is the one list of span names and attribute keys: producers and the sampler agree
through it, convention keys are spelled as the conventions spell them, and no producer writes a
name of that list as a bare string."""

from __future__ import annotations

import ast
import time
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

from inference.tracing import StepInfo, Tracing
from otel import names
from otel.sampling import StepThinningSampler

ROOT = Path(__file__).resolve().parents[2]
PRODUCERS = ("sidecar", "inference", "otel")


def _constants() -> dict[str, str]:
    return {k: v for k, v in vars(names).items() if k.isupper() and isinstance(v, str)}


def test_the_sampler_thins_the_step_spans_the_inference_server_records() -> None:
    """Rename the step span or its phase/index keys on one side only and decode steps stop being thinned."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=StepThinningSampler(ParentBased(ALWAYS_ON), decode_every=4))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider.get_tracer("inference"))
    with tracing.request_span("POST /v1/completions", {}, {}) as request:
        ctx = request.get_span_context()
        for index in range(10):
            step = StepInfo(index, "prefill" if index in (0, 5) else "decode", 1, 1, ("r",), time.time_ns(), (ctx,))
            # what inference/engine.py passes: the step's own attributes come from record_step
            tracing.record_step(step, time.time_ns(), [ctx], {names.GEN_AI_REQUEST_MODEL: "m"})
    tracing.close()  # built on the span thread: done before the provider shuts down
    provider.shutdown()
    steps = [s for s in exporter.get_finished_spans() if s.name == "engine.step"]
    assert [(s.attributes["kernelgate.step.index"], s.attributes["kernelgate.step.phase"]) for s in steps] == [
        (0, "prefill"), (4, "decode"), (5, "prefill"), (8, "decode")]
    assert all(s.attributes["gen_ai.request.model"] == "m" and s.parent.span_id == ctx.span_id for s in steps)


def test_thinned_steps_are_not_even_queued_when_tracing_knows_the_rule() -> None:
    """Tracing(decode_step_spans_every=N) applies the sampler's rule (otel.sampling.step_kept) before
    queueing: a thinned step returns no pending span and never reaches the span thread, even under a
    sampler that would keep it; the kept ones are the ones the sampler keeps."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider.get_tracer("inference"), decode_step_spans_every=4)
    with tracing.request_span("POST /v1/completions", {}, {}) as request:
        ctx = request.get_span_context()
        pending = [tracing.record_step(StepInfo(index, "prefill" if index in (0, 5) else "decode", 1, 1, ("r",),
                                                time.time_ns(), (ctx,)), time.time_ns(), [ctx], {})
                   for index in range(10)]
    tracing.close()
    provider.shutdown()
    assert [i for i, p in enumerate(pending) if p is not None] == [0, 4, 5, 8]
    steps = [s for s in exporter.get_finished_spans() if s.name == "engine.step"]
    assert [s.attributes["kernelgate.step.index"] for s in steps] == [0, 4, 5, 8]


def test_convention_keys_are_spelled_as_the_semantic_conventions_spell_them() -> None:
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes
    from opentelemetry.semconv.attributes import http_attributes

    ours = {k: v for k, v in _constants().items() if k.startswith(("HTTP_", "GEN_AI_"))}
    assert len(ours) >= 10
    for key, value in ours.items():
        module = http_attributes if key.startswith("HTTP_") else gen_ai_attributes
        assert getattr(module, key) == value, key


def test_every_name_is_listed_once() -> None:
    values = list(_constants().values())
    assert len(values) == len(set(values)), sorted(v for v in values if values.count(v) > 1)


def test_no_producer_spells_a_listed_name_as_a_bare_string() -> None:
    """Names with a dot (every attribute key, the dotted span and tracer names) may only be written
    in otel/names.py (logger names aside); one-word span names ("queue", "identity") are common words
    elsewhere too."""
    listed = {v: k for k, v in _constants().items() if "." in v}
    offenders = []
    for package in PRODUCERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "otel" / "names.py":
                continue
            tree = ast.parse(path.read_text(), str(path))
            loggers = {id(arg) for call in ast.walk(tree) if isinstance(call, ast.Call)
                       and getattr(call.func, "attr", getattr(call.func, "id", "")) == "getLogger" for arg in call.args}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and node.value in listed and id(node) not in loggers:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r} "
                                     f"(names.{listed[node.value]})")
    assert not offenders, offenders
