"""GPU benchmark of tracing: the kernel spans of one traced request, and the tokens/s tracing costs.

Runs the inference server (random-weight model, DeepSpeed kernel injection, CUDA graphs) twice,
in child processes started exactly as ``kernelgate serve`` starts it (``configure_tracing`` +
``kernel_tracing`` around ``inference.server.run``), with spans going to an OTLP file
(``telemetry.protocol: file``, protobuf: the OTLP/gRPC exporter's encoding; no collector there):

* ``off``: telemetry disabled;
* ``spans``: head sampling 100 %, no kernel traces (what the spans alone cost);
* ``on``: head sampling 100 %, kernel traces for ``--kernel-ratio`` of requests (by trace id);
* ``all-steps``: as ``on``, but every decode ``engine.step`` span kept (``decode_step_spans_every: 1``).

``overhead_pct`` is the tokens/s ``on`` loses against ``off``. ``--capture`` picks what records
the kernels (``kernels.capture``: auto = CUPTI through ``cupti-python`` when installed, else
torch's profiler); ``kernel_recorder`` in the result says which did.

Each is driven by ``--concurrency`` closed-loop clients that send a fresh sampled ``traceparent``
with every request (every mode does the same client work). With ``--schedule interleaved`` (the
default) all the servers stay up side by side on the GPU and take turns: in each of ``--windows``
rounds every mode gets one window (order alternating round by round, so drift over the run
falls on both sides alike), and only one server has load at a time. A mode's tokens/s is the
mean of its windows; ``overhead_pct`` compares those means, and ``overhead_pct_paired`` gives
the median and a bootstrap 90 % interval of the per-round losses: windows of one mode vary by
up to 13 % (the batch falls in and out of lock step), more than the cost measured, so one
window per mode, or modes run one after the other, cannot show a few per cent.
``--schedule sequential`` runs the modes one after another (median of windows), as before. Then, in the ``on`` server, one request forced with
``x-kernelgate-trace-kernels: 1`` (the header the sidecar passes only when the policy allows
it) is read back from the file: its ``gpu.forward`` spans, the kernel spans under them, and
whether every span lies inside its parent's time range.

    python3 bench/tracing_gpu.py --out bench/results/tracing_gpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.processes import free_port, start, wait_http  # noqa: E402

FORCE_HEADER = "x-kernelgate-trace-kernels"
REQUEST_SPAN = "POST /v1/completions"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-medium")
    p.add_argument("--deepspeed", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--windows", type=int, default=3, help="windows per mode (rounds, when interleaved)")
    p.add_argument("--schedule", choices=("interleaved", "sequential"), default="interleaved")
    p.add_argument("--window-s", type=float, default=10.0)
    p.add_argument("--kernel-ratio", type=float, default=0.01)
    p.add_argument("--max-captures-per-minute", type=int, default=1000,
                   help="high, so that --kernel-ratio, not the cap, decides how many requests are captured")
    p.add_argument("--steps-per-request", type=int, help="kernels.steps_per_request (default: the config's)")
    p.add_argument("--capture", choices=("auto", "cupti", "torch"), default="auto",
                   help="kernels.capture: what records the kernels (auto: cupti when cupti-python is installed)")
    p.add_argument("--modes", default="off,spans,on,all-steps",
                   help="off: no telemetry; spans: head sampling 100%%, no kernel traces; on: spans + kernel "
                        "traces; all-steps: on, keeping every decode step span")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of this script")
    p.add_argument("--out", default=str(ROOT / "bench/results/tracing_gpu.json"))
    p.add_argument("--log-dir", default=os.environ.get("OUT", "/tmp/kernelgate-tracing-bench"))
    p.add_argument("--work-dir", default="/tmp/kernelgate-tracing-bench")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the server child: what `kernelgate serve` does, without the sidecar's config sections --------------
def serve_child(config_path: str) -> int:
    from common.settings import build, load_file
    from inference.config import InferenceConfig
    from inference.server import run
    from inference.tracing import Tracing
    from otel.config import TelemetryConfig
    from otel.setup import configure_tracing, kernel_tracing

    data = load_file(config_path)
    inference = build(InferenceConfig, data.get("inference"), "inference")
    telemetry = build(TelemetryConfig, data.get("telemetry"), "telemetry")
    kernels = None
    with configure_tracing(telemetry, "kernelgate-inference"), kernel_tracing(telemetry) as kernels:
        run(inference, Tracing(request_observer=kernels), kernels)
    if kernels is not None:
        Path(config_path + ".kernels.json").write_text(json.dumps(kernels.stats.__dict__))
    return 0


def spans_file(args: argparse.Namespace, mode: str) -> Path:
    return Path(args.work_dir) / f"spans-{mode}.otlp"


def start_server(mode: str, args: argparse.Namespace) -> tuple[subprocess.Popen, int, Path, Path]:
    import yaml

    port = free_port()
    spans_path = spans_file(args, mode)
    spans_path.parent.mkdir(parents=True, exist_ok=True)
    spans_path.unlink(missing_ok=True)
    telemetry: dict[str, Any] = {"enabled": False}
    if mode != "off":
        telemetry = {"enabled": True, "protocol": "file", "otlp_endpoint": str(spans_path), "sampling_ratio": 1.0,
                     "export_delay_s": 0.5, "max_queue_size": 65536,
                     "decode_step_spans_every": 1 if mode == "all-steps" else 16,
                     "kernels": {"ratio": 0.0 if mode == "spans" else args.kernel_ratio,
                                 "max_captures_per_minute": args.max_captures_per_minute,
                                 "activities": "cuda" if args.device == "cuda" else "cpu", "capture": args.capture}}
        if args.steps_per_request:
            telemetry["kernels"]["steps_per_request"] = args.steps_per_request
    config = {"inference": {
        "listen": {"host": "127.0.0.1", "port": port},
        "model": {"name": args.model, "random_config": args.model, "device": args.device,
                  "use_deepspeed": args.deepspeed, "kernel_inject": True, "cuda_graphs": True,
                  "max_model_len": 2 ** (args.prompt_tokens + args.new_tokens + 16).bit_length()},
        "batching": {"max_batch_size": args.concurrency, "max_wait_ms": 2.0, "max_queue": 1024,
                     "max_tokens_in_flight": 1 << 20},
        "limits": {"request_timeout_s": 600, "drain_timeout_s": 30}}, "telemetry": telemetry}
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / f"server-{mode}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{mode}.log"
    server = start(log_path.stem, [sys.executable, __file__, "--serve", str(config_path)], log_path.parent, env={"PYTHONUNBUFFERED": "1"})
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=args.ready_timeout, proc=server)
    except TimeoutError:
        server.popen.kill()
        raise
    return server.popen, port, server.log_path, config_path


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def traceparent(trace_id: int | None = None) -> str:
    return f"00-{trace_id or random.getrandbits(128):032x}-{random.getrandbits(64):016x}-01"


async def drive(port: int, args: argparse.Namespace, prompts: list[list[int]], windows: int) -> list[dict[str, float]]:
    """Closed-loop clients; tokens/s of each window (requests that finish inside it)."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    finished: list[tuple[float, int]] = []
    stop_at = 0.0

    async def one(session: aiohttp.ClientSession, prompt: list[int]) -> int:
        async with session.post(url, json={"model": args.model, "prompt": prompt, "max_tokens": args.new_tokens,
                                           "temperature": 0, "ignore_eos": True},
                                headers={"traceparent": traceparent()}) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {body}")
            return body["usage"]["completion_tokens"]

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        i = index
        while time.perf_counter() < stop_at:
            tokens = await one(session, prompts[i % len(prompts)])
            finished.append((time.perf_counter(), tokens))
            i += args.concurrency

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(one(session, prompts[i]) for i in range(args.concurrency)))  # warm-up
        start = time.perf_counter() + 2.0  # let the batch fill before the first window
        stop_at = start + windows * args.window_s
        await asyncio.gather(*(client(session, i) for i in range(args.concurrency)))
    measured = []
    for w in range(windows):
        lo, hi = start + w * args.window_s, start + (w + 1) * args.window_s
        tokens = sum(t for at, t in finished if lo <= at < hi)
        requests = sum(1 for at, _ in finished if lo <= at < hi)
        measured.append({"tokens_per_s": round(tokens / args.window_s, 1), "requests": requests})
    return measured


async def forced_request(port: int, args: argparse.Namespace, prompt: list[int], trace_id: int) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/v1/completions",
                                json={"model": args.model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                      "ignore_eos": True},
                                headers={"traceparent": traceparent(trace_id), FORCE_HEADER: "1"}) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {body}")
            return body


# -- reading the trace back ------------------------------------------------------------------------------
def inspect_trace(spans_path: Path, trace_id: str) -> dict[str, Any]:
    from otel.otlp_file import read_otlp_file
    from tests.jaeger import parse_otlp

    traces = parse_otlp(*read_otlp_file(spans_path))
    trace = traces.get(trace_id)
    if trace is None:
        raise RuntimeError(f"trace {trace_id} not in {spans_path}")
    request = trace.one(REQUEST_SPAN)
    steps = sorted(trace.named("engine.step"), key=lambda s: s.start_ns)
    forwards = sorted(trace.named("gpu.forward"), key=lambda s: s.start_ns)
    outside: list[str] = []
    for span in trace.spans:
        parent = trace.parent(span)
        if parent is not None and not (parent.start_ns <= span.start_ns <= span.end_ns <= parent.end_ns):
            outside.append(f"{span.name} [{span.start_ns}, {span.end_ns}] not in {parent.name} "
                           f"[{parent.start_ns}, {parent.end_ns}]")
    per_forward = []
    for forward in forwards:
        kernels = trace.children(forward)
        a = forward.attributes
        per_forward.append({
            "phase": a.get("kernelgate.step.phase"), "batch_size": a.get("kernelgate.step.batch_size"),
            "recorder": a.get("kernelgate.kernels.recorder"),
            "parent": trace.parent(forward).name if trace.parent(forward) else None,
            "kernel_spans": len(kernels), "kernels_captured": a.get("kernelgate.kernels.count"),
            "folded": a.get("kernelgate.kernels.folded"), "dropped": a.get("kernelgate.kernels.dropped"),
            "kernels_clamped": a.get("kernelgate.kernels.clamped"),
            "gpu_time_us": round(a.get("kernelgate.kernels.gpu_time_ns", 0) / 1000, 1),
            "clock_uncertainty_us": round(a.get("kernelgate.clock.uncertainty_ns", 0) / 1000, 1),
            "forward_us": round((forward.end_ns - forward.start_ns) / 1000, 1),
            "all_kernels_inside_parent": all(forward.start_ns <= k.start_ns <= k.end_ns <= forward.end_ns
                                             for k in kernels)})
    return {"trace": trace, "request": request, "steps": steps, "forwards": forwards, "per_forward": per_forward,
            "outside": outside}


def capture_timing(spans_path: Path) -> dict[str, Any]:
    """Every captured pass of the run: its step's duration against the unprofiled steps of the
    same phase, and where the time went inside it (before the first kernel, the largest gap
    between kernels)."""
    from otel.otlp_file import read_otlp_file
    from tests.jaeger import parse_otlp

    traces = parse_otlp(*read_otlp_file(spans_path))
    steps = {s.span_id: s for t in traces.values() for s in t.spans if s.name == "engine.step"}
    profiled: set[str] = set()
    passes = []
    for trace in traces.values():
        for forward in trace.named("gpu.forward"):
            profiled.update(link.span_id for link in forward.links)
            profiled.add(forward.parent_id)
            starts = sorted((k.start_ns, k.end_ns, k.name) for k in trace.children(forward))
            if not starts:
                continue
            gaps = [(b[0] - a[0], b[2]) for a, b in zip(starts, starts[1:])]
            gap, before = max(gaps, default=(0, ""))
            passes.append({"phase": forward.attributes.get("kernelgate.step.phase"),
                           "first_kernel_us": (starts[0][0] - forward.start_ns) / 1e3,
                           "last_kernel_end_us": (max(e for _, e, _ in starts) - forward.start_ns) / 1e3,
                           "largest_gap_us": gap / 1e3, "largest_gap_before": before})
    out: dict[str, Any] = {"captured_passes": len(passes)}
    for phase in ("prefill", "decode"):
        for label, want in (("profiled", True), ("unprofiled", False)):
            durations = [(s.end_ns - s.start_ns) / 1e3 for sid, s in steps.items()
                         if s.attributes.get("kernelgate.step.phase") == phase and (sid in profiled) == want]
            if durations:
                out[f"{phase}_step_us_{label}"] = {"n": len(durations), "median": round(statistics.median(durations), 1),
                                                   "p90": round(sorted(durations)[int(0.9 * (len(durations) - 1))], 1)}
        mine = [p for p in passes if p["phase"] == phase]
        if mine:
            out[f"{phase}_passes_median"] = {k: round(statistics.median(p[k] for p in mine), 1)
                                             for k in ("first_kernel_us", "last_kernel_end_us", "largest_gap_us")}
            out[f"{phase}_largest_gap_before"] = sorted({p["largest_gap_before"] for p in mine})[:5]
    return out


def trimmed_example(found: dict[str, Any], kernels_per_forward: int = 8, steps_shown: int = 3) -> list[dict]:
    """The traced request's tree, times relative to the request span, kernels cut to a few per pass."""
    trace, request = found["trace"], found["request"]
    t0 = request.start_ns
    keep_steps = {s.span_id for s in found["steps"][:steps_shown]}
    out = []

    def row(span, depth: int) -> dict:
        keys = ("gen_ai.request.model", "gen_ai.request.max_tokens", "gen_ai.usage.input_tokens",
                "gen_ai.usage.output_tokens", "kernelgate.kernels.capture", "kernelgate.step.phase",
                "kernelgate.step.batch_size", "kernelgate.kernels.count", "kernelgate.kernels.folded",
                "gpu.kernel.name", "kernelgate.kernel.count", "gpu.stream")
        return {"depth": depth, "name": span.name, "service": span.service,
                "start_us": round((span.start_ns - t0) / 1000, 1),
                "duration_us": round((span.end_ns - span.start_ns) / 1000, 1),
                "attributes": {k: (v[:120] if isinstance(v, str) else v) for k, v in span.attributes.items()
                               if k in keys},
                **({"links": len(span.links)} if span.links else {})}

    def walk(span, depth: int) -> None:
        out.append(row(span, depth))
        children = trace.children(span)
        if span.name == "gpu.forward" and len(children) > kernels_per_forward:
            for child in children[:kernels_per_forward]:
                out.append(row(child, depth + 1))
            out.append({"depth": depth + 1, "name": f"... {len(children) - kernels_per_forward} more kernel spans"})
            return
        for child in children:
            if child.name == "engine.step" and child.span_id not in keep_steps:
                continue
            walk(child, depth + 1)

    walk(request, 0)
    if len(found["steps"]) > steps_shown:
        out.append({"depth": 1, "name": f"... {len(found['steps']) - steps_shown} more engine.step spans"})
    return out


# -- main ---------------------------------------------------------------------------------------------------
class ModeServer:
    """One mode's server, from start to the kernel tracer's counters it leaves behind."""

    def __init__(self, mode: str, args: argparse.Namespace) -> None:
        self.mode = mode
        self.proc, self.port, log_path, self.config_path = start_server(mode, args)
        self.result: dict[str, Any] = {"mode": mode, "windows": []}
        log = log_path.read_text()
        ready = re.search(r"ready \((\S+) backend.*CUDA graphs (on|off)", log)
        self.result["backend"], self.result["cuda_graphs"] = ready.groups() if ready else ("unknown", "unknown")
        fallback = re.search(r"DeepSpeed cannot inject .*", log)
        if fallback:
            self.result["deepspeed_fallback"] = fallback.group(0)

    def measure(self, args: argparse.Namespace, prompts: list[list[int]], windows: int) -> None:
        got = asyncio.run(drive(self.port, args, prompts, windows))
        self.result["windows"].extend(got)
        print(f"[{self.mode}] windows {[w['tokens_per_s'] for w in got]}", flush=True)

    def force_example(self, args: argparse.Namespace, prompts: list[list[int]]) -> None:
        """One request forced to a kernel trace, to read back from the spans file."""
        trace_id = random.getrandbits(128)
        self.result["example_trace_id"] = f"{trace_id:032x}"
        self.result["example_response"] = asyncio.run(forced_request(self.port, args, prompts[0], trace_id))["usage"]
        time.sleep(1.5)  # one export interval

    def stop(self, schedule: str) -> dict[str, Any]:
        stop_server(self.proc)
        stats_path = Path(str(self.config_path) + ".kernels.json")
        if stats_path.exists():
            self.result["kernel_tracer"] = json.loads(stats_path.read_text())
        values = [w["tokens_per_s"] for w in self.result["windows"]]
        self.result["tokens_per_s"] = round(statistics.fmean(values) if schedule == "interleaved"
                                            else statistics.median(values), 1)
        self.result["requests"] = sum(w["requests"] for w in self.result["windows"])
        return self.result


def run_sequential(modes: list[str], args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, dict]:
    runs = {}
    for mode in modes:
        server = ModeServer(mode, args)
        try:
            server.measure(args, prompts, args.windows)
            if mode == "on":
                server.force_example(args, prompts)
        finally:
            runs[mode] = server.stop(args.schedule)
    return runs


def run_interleaved(modes: list[str], args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, dict]:
    """All servers up at once; one window per mode per round, the order reversed every other round."""
    servers: dict[str, ModeServer] = {}
    try:
        for mode in modes:
            servers[mode] = ModeServer(mode, args)
        for round_index in range(args.windows):
            for mode in (modes if round_index % 2 == 0 else modes[::-1]):
                servers[mode].measure(args, prompts, 1)
        if "on" in servers:
            servers["on"].force_example(args, prompts)
    finally:
        runs = {mode: server.stop(args.schedule) for mode, server in servers.items()}
    return runs


def paired_loss(off: list[float], on: list[float], draws: int = 2000) -> dict[str, Any]:
    """Per-round tokens/s lost (%), and a bootstrap 90 % interval of the loss of the means."""
    losses = [100.0 * (a - b) / a for a, b in zip(off, on)]
    rng = random.Random(7)
    pairs = list(zip(off, on))
    boot = []
    for _ in range(draws):
        sample = [rng.choice(pairs) for _ in pairs]
        total_off = sum(a for a, _ in sample)
        boot.append(100.0 * (total_off - sum(b for _, b in sample)) / total_off)
    boot.sort()
    return {"rounds": len(losses), "per_round": [round(x, 2) for x in losses],
            "median": round(statistics.median(losses), 2),
            "interval_90": [round(boot[int(0.05 * draws)], 2), round(boot[int(0.95 * draws) - 1], 2)]}


def main() -> int:
    args = parse_args()
    if args.serve:
        return serve_child(args.serve)
    import torch

    from inference.model_configs import random_config

    random.seed(1)
    vocab = random_config(args.model).vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, min(vocab, 50000), (256, args.prompt_tokens), generator=gen).tolist()
    modes = args.modes.split(",")
    runs = (run_interleaved if args.schedule == "interleaved" else run_sequential)(modes, args, prompts)
    off, on = runs["off"], runs["on"]
    found = inspect_trace(spans_file(args, "on"), on["example_trace_id"])
    timing = capture_timing(spans_file(args, "on"))
    per_forward = found["per_forward"]
    kernel_spans = sum(f["kernel_spans"] for f in per_forward)
    def lost(mode: str) -> float | None:
        if mode not in runs:
            return None
        return round(100.0 * (off["tokens_per_s"] - runs[mode]["tokens_per_s"]) / off["tokens_per_s"], 2)

    overhead = lost("on")
    captured = (on.get("kernel_tracer") or {}).get("captures", 0)
    selected = (on.get("kernel_tracer") or {}).get("selected", 0)
    versions = {"torch": torch.__version__}
    for name in ("transformers", "deepspeed", "opentelemetry.sdk.version"):
        try:
            module = __import__(name, fromlist=["__version__"])
            versions[name.split(".")[0]] = module.__version__
        except Exception:  # noqa: BLE001 - report what is importable
            versions[name.split(".")[0]] = None
    from otel.config import KernelTraceConfig

    result = {
        "command": "python3 " + " ".join(shlex.quote(a) for a in sys.argv),
        "device": torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else "cpu",
        "versions": versions,
        "model": args.model, "backend": on.get("backend"), "cuda_graphs": on.get("cuda_graphs"),
        **({"deepspeed_fallback": on["deepspeed_fallback"]} if on.get("deepspeed_fallback") else {}),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "concurrency": args.concurrency,
        "kernel_spans": kernel_spans,
        "kernel_recorder": sorted({str(f["recorder"]) for f in per_forward}),
        "kernel_spans_by_forward": per_forward,
        "kernel_spans_inside_parent": all(f["all_kernels_inside_parent"] for f in per_forward) and bool(per_forward),
        "spans_outside_parent": found["outside"][:20],
        "example_trace_id": on["example_trace_id"],
        "example_trace": trimmed_example(found),
        "overhead_pct": overhead,
        **({"overhead_pct_paired": paired_loss([w["tokens_per_s"] for w in off["windows"]],
                                               [w["tokens_per_s"] for w in on["windows"]])}
           if args.schedule == "interleaved" else {}),
        "schedule": args.schedule,
        "overhead_pct_spans_only": lost("spans"),
        "overhead_pct_every_decode_step_span": lost("all-steps"),
        "tokens_per_s": {m: r["tokens_per_s"] for m, r in runs.items()},
        "windows": {m: r["windows"] for m, r in runs.items()},
        "modes": {"off": "telemetry disabled", "spans": "head sampling 100 %, kernel ratio 0",
                  "on": f"head sampling 100 %, kernel traces for {args.kernel_ratio:.0%} of requests, "
                        "1 decode engine.step span in 16 (the default)",
                  "all-steps": "as on, every decode engine.step span kept"},
        "tracing_on": {"head_sampling": 1.0, "kernel_ratio": args.kernel_ratio,
                       "max_captures_per_minute": args.max_captures_per_minute,
                       "steps_per_request": args.steps_per_request or KernelTraceConfig().steps_per_request,
                       "requests_in_windows": on["requests"], "requests_selected_for_kernels": selected,
                       "forward_passes_profiled": captured, "kernel_tracer": on.get("kernel_tracer"),
                       "capture_timing": timing,
                       "engine_thread_ms_per_profiled_pass": round(
                           (on.get("kernel_tracer") or {}).get("engine_thread_ns", 0) / 1e6 / max(captured, 1), 2),
                       "engine_thread_start_ms_per_profiled_pass": round(
                           (on.get("kernel_tracer") or {}).get("engine_start_ns", 0) / 1e6 / max(captured, 1), 2),
                       "worker_ms_per_profiled_pass": round(
                           (on.get("kernel_tracer") or {}).get("worker_ns", 0) / 1e6 / max(captured, 1), 2),
                       "exporter": "OTLP protobuf file (otel/otlp_file.py: same encoding as OTLP/gRPC), BatchSpanProcessor, 0.5 s delay"},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("example_trace", "windows")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
