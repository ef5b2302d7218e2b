"""CPU benchmark: what span recording costs the inference engine's thread per step.

The engine thread pays for tracing in three calls per forward pass: the forward observer's
``start``/``finish`` (``otel.kernels.KernelTracer`` when kernel capture is configured), and
``Tracing.record_step`` (the ``engine.step`` span), plus ``Tracing.record_child`` once per admitted
request (its ``queue`` span). This drives exactly those calls as ``inference/engine.py`` makes
them (batch of ``--batch`` requests, each living ``--steps-per-request`` steps, a prefill step at
each admission), with the SDK set up as ``otel.setup.configure_tracing`` sets it up (parent-based
ratio sampler with step thinning, batch span processor) and an exporter that drops the batches,
and measures the **engine thread's CPU time** (``time.thread_time_ns``) around those calls only.
Wall time (the loop's, which includes creating the
requests' spans) is not what counts here: on a GPU the engine thread mostly waits for the device, so
work moved to another thread overlaps that wait; on this CPU-only machine the GIL still makes
that thread's work visible in wall time, so the other threads' CPU time is reported apart. Each
step then sleeps ``--gpu-wait-us`` (GIL released, as in a CUDA sync) as the forward pass would.

Modes: ``off`` (no SDK: the API's no-op tracer, what ``telemetry.enabled: false`` gives),
``spans`` (SDK, every trace sampled), ``spans+kernels`` (plus an idle kernel tracer as observer),
``spans+export`` (as ``spans``, exported through the span export process with the file
exporter, the engine-side spans handed over as records: ``telemetry.export_process``, the default;
compare with ``spans --exporter file``, the in-process encoding). ``process_cpu_us_per_step`` is
the CPU time of the whole process (every thread, the request spans' creation included; the
export child not) per step, from the first step to every span handed to the exporter.

    python3 bench/tracing_engine_cpu.py --steps 5000 --repeats 5 --out bench/results/tracing_engine_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased  # noqa: E402

from inference.tracing import StepInfo, Tracing  # noqa: E402
from otel import names  # noqa: E402
from otel.config import KernelTraceConfig  # noqa: E402
from otel.kernels.torch_capture import TorchProfilerCapture  # noqa: E402
from otel.kernels.tracer import KernelTracer  # noqa: E402
from otel.sampling import StepThinningSampler  # noqa: E402


class DropExporter(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def thread_cpu_ns(thread: threading.Thread) -> int:
    return time.clock_gettime_ns(time.pthread_getcpuclockid(thread.ident))


def busy(us: float) -> None:
    """The engine step's own Python work (sampling bookkeeping, detokenizing, delivering): holds the GIL."""
    end = time.perf_counter_ns() + us * 1000
    while time.perf_counter_ns() < end:
        pass


def make_exporter(args: argparse.Namespace, mode: str) -> SpanExporter:
    if args.exporter == "drop":
        return DropExporter()
    from otel.otlp_file import OTLPFileExporter

    path = Path(tempfile.gettempdir()) / f"tracing-engine-cpu-{os.getpid()}-{mode}.otlp"
    path.unlink(missing_ok=True)
    return OTLPFileExporter(path)  # the OTLP/gRPC exporter's encoding, to a file


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    before = {t.ident for t in threading.enumerate()}
    sink = None
    if mode == "spans+export":
        from otel.config import TelemetryConfig
        from otel.export_process import ProcessSpanExporter

        path = Path(tempfile.gettempdir()) / f"tracing-engine-cpu-{os.getpid()}-export.otlp"
        path.unlink(missing_ok=True)
        exporter: SpanExporter = ProcessSpanExporter(TelemetryConfig(enabled=True, protocol="file",
                                                                     otlp_endpoint=str(path)))
        sink = exporter.send_span
    else:
        exporter = make_exporter(args, mode)
    provider = None
    if mode == "off":
        tracer = trace.NoOpTracer()
    else:
        provider = TracerProvider(sampler=StepThinningSampler(ParentBased(TraceIdRatioBased(1.0)),
                                                              args.decode_every))
        if args.paced:
            from otel.paced_export import PacedSpanExporter

            exporter = PacedSpanExporter(exporter, args.paced)
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=8192,
                                                       schedule_delay_millis=args.export_delay_ms))
        tracer = provider.get_tracer(names.INFERENCE_TRACER)
    kernels = None
    if mode == "spans+kernels":
        kernels = KernelTracer(KernelTraceConfig(ratio=0.0), provider.get_tracer(names.KERNELS_TRACER),
                               TorchProfilerCapture("cpu"))
    # as the server makes it (kernelgate serve passes telemetry.decode_step_spans_every)
    tracing = Tracing(tracer, request_observer=kernels, decode_step_spans_every=args.decode_every, sink=sink)
    model_attrs = {names.GEN_AI_REQUEST_MODEL: "tiny"}
    wall_began = time.perf_counter_ns()
    cpu_began = time.process_time_ns()

    engine_ns = 0
    steps = 0
    late: list[int] = []  # how much longer the step's own work and wait took than asked: GIL waits, scheduling
    requests: list = []
    for index in range(args.steps):
        admit = index % args.steps_per_request == 0
        if admit:  # a new batch (on the event loop in the server: not timed)
            for span in requests:
                span.end()
            requests = [tracer.start_span("POST /v1/completions") for _ in range(args.batch)]
        contexts = tuple(s.get_span_context() for s in requests)
        began = time.thread_time_ns()
        # -- what the engine thread does for tracing in one step (inference/engine.py) --
        if admit:
            now = time.time_ns()
            for i, ctx in enumerate(contexts):
                tracing.record_child(names.QUEUE_SPAN, ctx, now - 1000, now, {names.QUEUE_SLOT: i})
        step = StepInfo(index=index, phase="prefill" if admit else "decode", batch_size=args.batch,
                        num_tokens=args.batch * (16 if admit else 1), request_ids=tuple(map(str, range(args.batch))),
                        start_time_ns=time.time_ns(), trace_contexts=contexts,
                        tokens_per_sequence=(16 if admit else 1,) * args.batch)
        if kernels is not None:
            kernels.start(step)
        span_context = tracing.record_step(step, time.time_ns(), contexts, model_attrs)
        if kernels is not None:
            kernels.finish(step, span_context)
        engine_ns += time.thread_time_ns() - began
        steps += 1
        waited = time.perf_counter_ns()
        if args.engine_work_us:
            busy(args.engine_work_us)
        if args.gpu_wait_us:  # the next step's forward pass: the engine thread waits with the GIL released
            time.sleep(args.gpu_wait_us / 1e6)
        late.append(time.perf_counter_ns() - waited - (args.engine_work_us + args.gpu_wait_us) * 1000)
    for span in requests:
        span.end()
    wall_ns = time.perf_counter_ns() - wall_began
    flush = getattr(tracing, "flush", None)
    if flush is not None:
        flush()
    if provider is not None:
        provider.force_flush()
    cpu_ns = time.process_time_ns() - cpu_began
    # CPU time of the threads this run started (the span thread, the span processor's, the kernel tracer's)
    others = {t.name: thread_cpu_ns(t) for t in threading.enumerate() if t.ident not in before and t.is_alive()}
    close = getattr(tracing, "close", None)
    if close is not None:
        close()
    if kernels is not None:
        kernels.close()
    if provider is not None:
        provider.shutdown()
    return {"engine_us_per_step": engine_ns / steps / 1000, "exported_spans": getattr(exporter, "spans", getattr(exporter, "sent", None)),
            "wall_us_per_step": wall_ns / steps / 1000, "process_cpu_us_per_step": cpu_ns / steps / 1000,
            "late_us_mean": statistics.fmean(late) / 1000 if late else 0.0,
            "late_us_p99": sorted(late)[int(len(late) * 0.99)] / 1000 if late else 0.0,
            "other_threads_cpu_us_per_step": {k: round(v / steps / 1000, 3) for k, v in others.items() if v > 0}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps-per-request", type=int, default=64)
    p.add_argument("--decode-every", type=int, default=16, help="telemetry.decode_step_spans_every")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gpu-wait-us", type=float, default=1000.0,
                   help="GIL-free wait per step standing in for the GPU (H200 decode step: ~1800 us); 0: none")
    p.add_argument("--modes", default="off,spans,spans+kernels")
    p.add_argument("--engine-work-us", type=float, default=0.0,
                   help="the step's other Python work (GIL held), to see GIL waits in the wall time per step")
    p.add_argument("--exporter", choices=("drop", "file"), default="drop",
                   help="drop: no encoding; file: otel/otlp_file.py (the OTLP/gRPC encoding work)")
    p.add_argument("--export-delay-ms", type=int, default=500, help="the batch span processor's schedule delay")
    p.add_argument("--paced", type=int, default=0, help="otel/paced_export.py max chunk weight (0: not paced)")
    p.add_argument("--switch-interval-ms", type=float, default=0.0, help="sys.setswitchinterval (0: Python's 5 ms)")
    p.add_argument("--out", default="")
    p.add_argument("--label", default="")
    args = p.parse_args()
    modes = args.modes.split(",")
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every mode alike
        for mode in modes:
            runs[mode].append(run_mode(mode, args))
    summary = {m: {"engine_us_per_step_median": round(statistics.median(r["engine_us_per_step"] for r in rs), 2),
                   "engine_us_per_step": [round(r["engine_us_per_step"], 2) for r in rs],
                   "exported_spans": rs[-1]["exported_spans"],
                   "wall_us_per_step_median": round(statistics.median(r["wall_us_per_step"] for r in rs), 2),
                   "process_cpu_us_per_step_median": round(statistics.median(r["process_cpu_us_per_step"]
                                                                             for r in rs), 2),
                   "process_cpu_us_per_step": [round(r["process_cpu_us_per_step"], 2) for r in rs],
                   "late_us_mean": [round(r["late_us_mean"], 1) for r in rs],
                   "late_us_p99": [round(r["late_us_p99"], 1) for r in rs],
                   "other_threads_cpu_us_per_step": rs[-1]["other_threads_cpu_us_per_step"]}
               for m, rs in runs.items()}
    result = {"command": "python3 " + " ".join(sys.argv), "label": args.label, "machine": platform.node(),
              "python": platform.python_version(), "batch": args.batch, "steps": args.steps,
              "steps_per_request": args.steps_per_request, "decode_every": args.decode_every,
              "gpu_wait_us": args.gpu_wait_us, "engine_work_us": args.engine_work_us, "exporter": args.exporter,
              "paced": args.paced, "switch_interval_s": sys.getswitchinterval(),
              "measure": "engine thread CPU time (time.thread_time_ns) around its tracing calls only",
              "modes": summary}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
