"""What exporting a span costs the serving process: OTLP encoding in it, against flattening for the
export process (``telemetry.export_process``, otel/export_process.py). CPU only, side by side.

Spans shaped like the inference server's (SDK spans, the server's resource): request spans with
the gen_ai attributes, ``preprocess`` and ``queue`` children, and ``engine.step`` spans with 16
links. Each path is timed over the same batches, alternated, ``--repeats`` times; the median per
span is reported.

``*_built``: an ``engine.step`` span with 16 links and a ``queue`` span from the moment the span
thread builds them: SDK span through the tracer, then encoded or flattened, against a plain record
pickled (otel/span_records.py, what the span thread hands the export process now).

``kernel_pass``: one captured pass's kernel spans (the kernel tracer's worker, from the planned
spans on: 24 layers x 20 kernel names, folded after 8, ~200 spans), per pass and per kernel span:
``tracer_otlp_encode`` (SDK spans through the tracer, encoded in this process: the in-process
default), ``tracer_flatten_pickle`` (SDK spans, flattened for the export process: its first
version) and ``record_pickle`` (one compact record handed to the export process: otel/kernels/emit.py,
no SDK span object here).

    python3 bench/span_export_cost.py --out bench/results/span_export_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def spans(requests: int, steps: int) -> tuple[list, list]:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Link

    from otel import names

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "kernelgate-inference", "service.version": "0.1",
                                                 "k8s.pod.name": "kernelgate-0", "k8s.namespace.name": "kernelgate"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer(names.INFERENCE_TRACER)
    contexts = []
    for i in range(requests):
        attributes = {names.GEN_AI_OPERATION_NAME: "text_completion", names.GEN_AI_REQUEST_MODEL: "gpt2-medium",
                      names.GEN_AI_REQUEST_MAX_TOKENS: 64, names.GEN_AI_REQUEST_TEMPERATURE: 1.0,
                      names.GEN_AI_REQUEST_TOP_P: 1.0, names.GEN_AI_USAGE_INPUT_TOKENS: 128,
                      names.GEN_AI_USAGE_OUTPUT_TOKENS: 64, names.GEN_AI_RESPONSE_ID: f"cmpl-{i:024x}",
                      names.GEN_AI_RESPONSE_FINISH_REASONS: ("length",), names.TENANT: "acme",
                      names.MODEL_VERSION: "v1", names.REPLICA_ID: "10.0.0.1:8000"}
        with tracer.start_as_current_span("POST /v1/completions", attributes=attributes) as request:
            contexts.append(request.get_span_context())
            tracer.start_span(names.PREPROCESS_SPAN).end()
            tracer.start_span(names.QUEUE_SPAN, attributes={names.QUEUE_SLOT: i % 16}).end()
    plain = list(memory.get_finished_spans())
    memory.clear()
    for i in range(steps):
        tracer.start_span(names.STEP_SPAN, links=[Link(c) for c in contexts[i % (requests - 16):][:16]],
                          attributes={names.STEP_PHASE: "decode", names.STEP_INDEX: i * 16,
                                      names.STEP_BATCH_SIZE: 16, names.STEP_NUM_TOKENS: 16,
                                      names.GEN_AI_REQUEST_MODEL: "gpt2-medium"}).end()
    return plain, list(memory.get_finished_spans())


def kernel_pass_paths() -> tuple[dict, int]:
    """The three ways one planned pass leaves the worker, each a callable doing all of it once."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otel import names
    from otel.export_process import _RECORDS, _SPANS, flatten
    from otel.kernels.emit import ForwardRecord, emit_with_tracer, kernel_tuples
    from otel.span_records import new_span_id
    from otel.kernels.plan import ClockAnchor, KernelEvent, plan_kernel_spans

    kernel_names = [f"void at::native::kernel_{i}<float, 4, at::native::Functor{i}>(int, float const*, float*)"
                    for i in range(20)]
    events, t = [], 1_000_000
    for _layer in range(24):
        for name in kernel_names:
            events.append(KernelEvent(name, t, t + 3000, 0, 7))
            t += 3500
    plan = plan_kernel_spans(events, ClockAnchor(0, 0, 100), (0, t + 10), 8, 512)
    attributes = {names.STEP_INDEX: 100, names.STEP_PHASE: "decode", names.STEP_BATCH_SIZE: 16,
                  names.KERNELS_CAPTURE: "ratio", names.KERNELS_SOURCE: "derived", names.KERNELS_COUNT: len(events),
                  names.KERNELS_SPANS: len(plan.spans), names.KERNELS_GRAPH_KEY: "0,16,256"}
    resource = Resource.create({"service.name": "kernelgate-inference", "k8s.pod.name": "kernelgate-0"})
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer(names.KERNELS_TRACER)

    def record(span_id: int) -> ForwardRecord:
        return ForwardRecord(0xABC, span_id, 0x12, False, 0, t + 10, dict(attributes), ((0xABC, 0x34, 1),),
                             kernel_tuples(plan.spans), True)

    def through_tracer() -> list:
        memory.clear()
        emit_with_tracer(tracer, record(0), pause=lambda: None)
        return list(memory.get_finished_spans())

    paths = {
        "tracer_otlp_encode": lambda: encode_spans(through_tracer()).SerializeToString(),
        "tracer_flatten_pickle": lambda: pickle.dumps((_SPANS, *flatten(through_tracer())),
                                                      protocol=pickle.HIGHEST_PROTOCOL),
        "record_pickle": lambda: pickle.dumps((_RECORDS, [], [tuple(record(new_span_id()))],
                                               dict(resource.attributes)), protocol=pickle.HIGHEST_PROTOCOL),
    }
    return paths, 1 + len(plan.spans)


def built_span_paths() -> dict[str, tuple[dict, int]]:
    """Spans the inference server builds after the fact (an ``engine.step`` with 16 links, a ``queue``),
    from the moment they are built: through the SDK tracer and then encoded (in-process export) or
    flattened (export process, SDK spans), against a plain record pickled (export process, records)."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanContext, TraceFlags

    from otel import names
    from otel.export_process import _RECORDS, _SPANS, flatten
    from otel.span_records import SpanRecord, new_span_id

    resource = Resource.create({"service.name": "kernelgate-inference", "k8s.pod.name": "kernelgate-0"})
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer(names.INFERENCE_TRACER)
    contexts = [SpanContext(i + 1, i + 100, False, TraceFlags(1)) for i in range(16)]
    attrs = {names.STEP_PHASE: "prefill", names.STEP_INDEX: 64, names.STEP_BATCH_SIZE: 16,
             names.STEP_NUM_TOKENS: 2048, names.GEN_AI_REQUEST_MODEL: "gpt2-medium"}
    n = 50

    def sdk_steps() -> list:
        memory.clear()
        for _ in range(n):
            span = tracer.start_span(names.STEP_SPAN, context=trace.set_span_in_context(
                trace.NonRecordingSpan(contexts[0])), start_time=1, attributes=dict(attrs))
            for c in contexts:
                span.add_link(c)
            span.end(end_time=2)
        return list(memory.get_finished_spans())

    def record_steps() -> bytes:
        records = [tuple(SpanRecord(names.STEP_SPAN, 1, new_span_id(), 100, False, 1, 2, dict(attrs),
                                    tuple((c.trace_id, c.span_id, 1) for c in contexts), names.INFERENCE_TRACER))
                   for _ in range(n)]
        return pickle.dumps((_RECORDS, records, [], dict(resource.attributes)), protocol=pickle.HIGHEST_PROTOCOL)

    def sdk_queues() -> list:
        memory.clear()
        for i in range(n):
            tracer.start_span(names.QUEUE_SPAN, context=trace.set_span_in_context(trace.NonRecordingSpan(contexts[0])),
                              start_time=1, attributes={names.QUEUE_SLOT: i % 16}).end(end_time=2)
        return list(memory.get_finished_spans())

    def record_queues() -> bytes:
        records = [tuple(SpanRecord(names.QUEUE_SPAN, 1, new_span_id(), 100, False, 1, 2, {names.QUEUE_SLOT: i % 16},
                                    (), names.INFERENCE_TRACER)) for i in range(n)]
        return pickle.dumps((_RECORDS, records, [], dict(resource.attributes)), protocol=pickle.HIGHEST_PROTOCOL)

    def ways(sdk, record) -> dict:
        return {"tracer_otlp_encode": lambda: encode_spans(sdk()).SerializeToString(),
                "tracer_flatten_pickle": lambda: pickle.dumps((_SPANS, *flatten(sdk())),
                                                              protocol=pickle.HIGHEST_PROTOCOL),
                "record_pickle": record}

    return {"engine_step_16_links_built": (ways(sdk_steps, record_steps), n),
            "queue_built": (ways(sdk_queues, record_queues), n)}


def timed(paths: dict, per: int, repeats: int) -> dict[str, float]:
    """Median microseconds per item of each path, the paths alternated ``repeats`` times."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            began = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - began) * 1e6 / per)
    return {name: round(statistics.median(t), 2) for name, t in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=str(ROOT / "bench/results/span_export_cost.json"))
    args = p.parse_args()
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from otel.export_process import flatten

    paths = {"otlp_encode": lambda batch: encode_spans(batch).SerializeToString(),
             "flatten_pickle": lambda batch: pickle.dumps(flatten(batch), protocol=pickle.HIGHEST_PROTOCOL)}
    plain, steps = spans(args.requests, args.steps)
    result: dict = {"command": "python3 " + " ".join(sys.argv), "python": platform.python_version(),
                    "machine": platform.processor() or platform.machine(),
                    "load_average_1m": round(os.getloadavg()[0], 2), "us_per_span": {}}
    for label, batch in (("request_preprocess_queue", plain), ("engine_step_16_links", steps)):
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.repeats):
            for name, run in paths.items():  # alternated: drift falls on both alike
                began = time.perf_counter()
                run(batch)
                times[name].append((time.perf_counter() - began) / len(batch) * 1e6)
        medians = {name: round(statistics.median(t), 1) for name, t in times.items()}
        result["us_per_span"][label] = {**medians, "spans": len(batch),
                                        "ratio": round(medians["otlp_encode"] / medians["flatten_pickle"], 2)}
    for label, (paths, per) in built_span_paths().items():
        medians = timed(paths, per, args.repeats)
        result["us_per_span"][label] = {**medians, "ratio": round(medians["tracer_otlp_encode"]
                                                                  / medians["record_pickle"], 1)}
    kernel_paths, spans_per_pass = kernel_pass_paths()
    per_pass = timed(kernel_paths, 1, args.repeats)
    result["kernel_pass"] = {"spans_per_pass": spans_per_pass, "us_per_pass": per_pass,
                             "us_per_span": {name: round(v / spans_per_pass, 2) for name, v in per_pass.items()},
                             "ratio": round(per_pass["tracer_otlp_encode"] / per_pass["record_pickle"], 2)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
