"""What exporting a span costs the serving process: OTLP encoding in it, against flattening for the
export process (``telemetry.export_process``, otel/export_process.py). CPU only, side by side.

Spans shaped like the inference server's (SDK spans, the server's resource): request spans with
the gen_ai attributes, ``preprocess`` and ``queue`` children, and ``engine.step`` spans with 16
links. Each path is timed over the same batches, alternated, ``--repeats`` times; the median per
span is reported.

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
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
