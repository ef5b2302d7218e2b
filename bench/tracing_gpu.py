"""GPU benchmark of tracing: the tokens/s tracing costs, settled over many rounds, and the kernel
spans of one traced request.

Runs the inference server (random-weight model, CUDA-graph decode) once per mode, in child
processes started exactly as ``kernelgate serve`` starts it (``configure_tracing`` +
``kernel_tracing`` around ``inference.server.run``), with spans going to an OTLP file
(``telemetry.protocol: file``, protobuf: the OTLP/gRPC exporter's encoding; no collector there).
Modes (``--modes``):

* ``off``: telemetry disabled;
* ``spans``: head sampling 100 %, no kernel traces (what the spans alone cost);
* ``on``: head sampling 100 %, kernel traces for ``--kernel-ratio`` of requests;
* ``ratio=R``: as ``on`` with kernel traces for R of requests (the cost curve);
* ``ratio=R:budget=PCT``: as ``ratio=R`` under a stall budget of PCT % (``kernels.stall_budget_pct``;
  every other mode runs with ``--stall-budget-pct``, 0 by default, so that the ratio decides);
* ``inline``: as ``on``, CUPTI attached on the engine thread at the pass (``kernels.prepare_ahead: false``);
* ``recorded``: as ``on``, every captured pass recorded, none derived (``kernels.derive: false``: the
  capture path before derived kernel spans);
* ``all-steps``: as ``on``, every decode ``engine.step`` span kept (``decode_step_spans_every: 1``);
* ``MODE+export`` / ``MODE+inproc`` (e.g. ``on+inproc``): as MODE, spans encoded and sent by a child
  process (``telemetry.export_process: true``, otel/export_process.py: the default, so plain modes
  do this too) / by the server process itself (``export_process: false``, the path before).

**How the cost is measured.** All of a run's servers stay up side by side on the GPU and take
turns: a *round* gives every mode one window (the order reversed every other round, so drift
falls on all modes alike), and only one server has load at a time. A window starts
``--concurrency`` closed-loop clients (each request with a fresh sampled ``traceparent``; every
mode does the same client work), lets the batch fill for ``--ramp-s``, then counts the tokens
the server generated in ``--window-s`` from its own ``kernelgate_inference_generated_tokens``
counter (read from ``/metrics`` at both ends: exact, where counting finished requests moved in
steps of a whole batch, 2 % of a window). A mode's loss is pooled over all rounds (the tokens/s
of its windows against ``off``'s, summed over rounds) with a bootstrap 90 % interval (rounds
resampled within each run); rounds go on until that interval of ``on`` is narrower than
``±--target-halfwidth`` points, or ``--max-rounds``, or ``--time-budget-s``. ``--runs`` repeats
the whole thing with fresh servers; every run's and every window's figures are written. Each
window also records the server process's CPU time per 1000 tokens (``server_cpu_ms_per_1k_tokens``,
all its threads from /proc, its span export child not counted; the median per mode at the top).

Which requests get kernel traces: trace ids decide, as in production (``kernels.ratio``, the
same test as OTel's ``TraceIdRatioBased``). With ``--trace-ids stratified`` (the default) the
clients draw the ids so that exactly one request in 1/R of each mode falls inside its ratio R,
at a random place in each block, instead of a binomial count: the benchmark measures the cost of
that ratio, not the luck of the draw.

Then, in the ``on`` server, two requests forced with ``x-kernelgate-trace-kernels: 1``, one after the
other, are read back from the file: the first one's decode pass is usually *recorded* (no other
batch-1 replay of its graph was recorded yet), the second one's *derived* from it
(``kernels.derive``, docs/tracing.md); their ``gpu.forward`` spans, the kernel spans under them,
and whether every span lies inside its parent's time range. Over the whole ``on`` spans file,
``kernel_spans_by_source`` counts the recorded and derived ``gpu.forward`` and kernel spans and
checks that each kernel span lies inside its ``gpu.forward`` and each ``gpu.forward`` inside its
parent.

    python3 bench/tracing_gpu.py --no-deepspeed --modes off,spans,on --out bench/results/tracing_gpu.json
    # the cost curve over kernel-trace ratios 0.1 %, 1 % (on), 10 % in one run, written as cost_curve:
    python3 bench/tracing_gpu.py --no-deepspeed --modes off,spans,ratio=0.001,on,ratio=0.1
    # the same with every captured pass recorded (kernels.derive: false), and 10 % under a 1 % stall budget:
    python3 bench/tracing_gpu.py --no-deepspeed --modes off,on,recorded,ratio=0.1:budget=1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.processes import free_port, start, wait_http  # noqa: E402
from otel import names  # noqa: E402

FORCE_HEADER = "x-kernelgate-trace-kernels"
REQUEST_SPAN = names.http_server_span_name("POST", "/v1/completions")
TOKENS_METRIC = re.compile(rb"^kernelgate_inference_generated_tokens_total (\S+)$", re.M)
_LOW = 1 << 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-medium")
    p.add_argument("--deepspeed", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--modes", default="off,on",
                   help="off, spans, on, ratio=R, inline, all-steps (see above); the first is the baseline")
    p.add_argument("--kernel-ratio", type=float, default=0.01, help="kernels.ratio of mode on")
    p.add_argument("--runs", type=int, default=1, help="independent runs, each with fresh servers")
    p.add_argument("--warmup-rounds", type=int, default=1,
                   help="rounds per run measured first and not counted (the GPU's first load ran ~20 %% slow)")
    p.add_argument("--min-rounds", type=int, default=6, help="rounds per run before stopping is considered")
    p.add_argument("--max-rounds", type=int, default=60, help="rounds per run at most")
    p.add_argument("--target-halfwidth", type=float, default=1.0,
                   help="stop once the 90%% interval of on's pooled loss is within +- this many points")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="stop starting rounds (past --min-rounds) after this many seconds of measuring, over all "
                        "runs, server starts not counted (0: no limit)")
    p.add_argument("--pool-with", nargs="*", default=[], metavar="RESULT",
                   help="earlier results of this script (same model and load) whose runs count as runs of this one: "
                        "each mode's loss is pooled over every run that measured it, and all runs are written")
    p.add_argument("--earlier", metavar="RESULT",
                   help="an earlier result of this script measured on other code: its cost curve and per-mode "
                        "losses are written beside this run's under earlier_code (labelled, never pooled)")
    p.add_argument("--pool-only", action="store_true",
                   help="measure nothing: pool the --pool-with results (the traced example: the last one's)")
    p.add_argument("--window-s", type=float, default=3.0)
    p.add_argument("--ramp-s", type=float, default=0.6, help="load before each window's count starts")
    p.add_argument("--trace-ids", choices=("stratified", "random"), default="stratified")
    p.add_argument("--max-captures-per-minute", type=int, default=100000,
                   help="high, so that the ratio (and the stall budget), not this cap, decides")
    p.add_argument("--stall-budget-pct", type=float, default=0.0,
                   help="kernels.stall_budget_pct of every mode but ratio=R:budget=PCT ones (default 0: no cap, "
                        "so that the ratio decides; the config's default is 1)")
    p.add_argument("--steps-per-request", type=int, help="kernels.steps_per_request (default: the config's)")
    p.add_argument("--capture", choices=("auto", "cupti", "torch"), default="auto",
                   help="kernels.capture: what records the kernels (auto: cupti when cupti-python is installed)")
    p.add_argument("--export-process", action="store_true",
                   help="every traced mode exports spans through a child process (telemetry.export_process), so "
                        "that on, the headline, includes it; pool only with runs made with it")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of this script")
    p.add_argument("--out", default=str(ROOT / "bench/results/tracing_gpu.json"))
    p.add_argument("--log-dir", default=os.environ.get("OUT", "/tmp/kernelgate-tracing-bench"))
    p.add_argument("--work-dir", default="/tmp/kernelgate-tracing-bench")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- modes ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mode:
    name: str
    telemetry: bool
    ratio: float = 0.0
    decode_every: int = 16
    prepare_ahead: bool = True
    stall_budget_pct: float | None = None  # None: --stall-budget-pct
    derive: bool = True  # kernels.derive
    export_process: bool | None = None  # telemetry.export_process (None: its default)

    @property
    def slug(self) -> str:
        """The mode in file names (letters, digits, '.', '-' and '_' only)."""
        return re.sub(r"[^A-Za-z0-9._-]", "_", self.name)

    def describe(self) -> str:
        if not self.telemetry:
            return "telemetry disabled"
        parts = [f"head sampling 100 %, kernel traces for {self.ratio:.1%} of requests",
                 "1 decode engine.step span in 16" if self.decode_every == 16 else "every decode engine.step span"]
        if not self.prepare_ahead:
            parts.append("CUPTI attached on the engine thread")
        from otel.config import TelemetryConfig

        if TelemetryConfig().export_process if self.export_process is None else self.export_process:
            parts.append("spans exported by a child process")
        else:
            parts.append("spans exported in the server process")
        if self.ratio and not self.derive:
            parts.append("every captured pass recorded (kernels.derive: false)")
        if self.stall_budget_pct is not None:
            parts.append(f"stall budget {self.stall_budget_pct:g} %")
        return ", ".join(parts)


def parse_mode(name: str, kernel_ratio: float) -> Mode:
    base, sep, export = name.partition("+")
    if sep:  # MODE+export / MODE+inproc: as MODE, spans exported by a child process / by the server itself
        mode = parse_mode(base, kernel_ratio)
        if export not in ("export", "inproc") or not mode.telemetry:
            raise SystemExit(f"--modes: {name}: MODE+export or MODE+inproc, MODE one with telemetry")
        return replace(mode, name=name, export_process=export == "export")
    if name == "off":
        return Mode(name, telemetry=False)
    if name == "spans":
        return Mode(name, telemetry=True)
    if name == "on":
        return Mode(name, telemetry=True, ratio=kernel_ratio)
    if name == "inline":
        return Mode(name, telemetry=True, ratio=kernel_ratio, prepare_ahead=False)
    if name == "recorded":
        return Mode(name, telemetry=True, ratio=kernel_ratio, derive=False)
    if name == "all-steps":
        return Mode(name, telemetry=True, ratio=kernel_ratio, decode_every=1)
    if name.startswith("ratio="):
        ratio_part, _, budget_part = name.partition(":")
        ratio = float(ratio_part.split("=", 1)[1])
        if not 0.0 <= ratio <= 1.0:
            raise SystemExit(f"--modes: {name}: a ratio is within 0..1")
        budget = None
        if budget_part:
            if not budget_part.startswith("budget="):
                raise SystemExit(f"--modes: {name}: ratio=R or ratio=R:budget=PCT")
            budget = float(budget_part.split("=", 1)[1])
        return Mode(name, telemetry=True, ratio=ratio, stall_budget_pct=budget)
    raise SystemExit(f"--modes: unknown mode {name!r} (off, spans, on, ratio=R[:budget=PCT], inline, all-steps)")


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
        run(inference, Tracing(request_observer=kernels, decode_step_spans_every=telemetry.decode_step_spans_every),
            kernels)
    if kernels is not None:
        stats = dict(kernels.stats.__dict__, budget_cost_ns=round(kernels.budget.cost_ns),
                     recorder=kernels.recorder_timings())
        Path(config_path + ".kernels.json").write_text(json.dumps(stats))
    return 0


def spans_file(args: argparse.Namespace, run: int, mode: Mode) -> Path:
    return Path(args.work_dir) / f"spans-{run}-{mode.slug}.otlp"


def server_config(mode: Mode, args: argparse.Namespace, port: int, spans_path: Path) -> dict[str, Any]:
    telemetry: dict[str, Any] = {"enabled": False}
    if mode.telemetry:
        kernels: dict[str, Any] = {"ratio": mode.ratio, "max_captures_per_minute": args.max_captures_per_minute,
                                   "activities": "cuda" if args.device == "cuda" else "cpu", "capture": args.capture,
                                   "prepare_ahead": mode.prepare_ahead, "derive": mode.derive}
        if args.steps_per_request:
            kernels["steps_per_request"] = args.steps_per_request
        kernels["stall_budget_pct"] = (mode.stall_budget_pct if mode.stall_budget_pct is not None
                                       else args.stall_budget_pct)
        telemetry = {"enabled": True, "protocol": "file", "otlp_endpoint": str(spans_path), "sampling_ratio": 1.0,
                     "export_delay_s": 0.5, "max_queue_size": 65536, "decode_step_spans_every": mode.decode_every,
                     "kernels": kernels}
        if mode.export_process is not None:
            telemetry["export_process"] = mode.export_process
    return {"inference": {
        "listen": {"host": "127.0.0.1", "port": port},
        "model": {"name": args.model, "random_config": args.model, "device": args.device,
                  "use_deepspeed": args.deepspeed, "kernel_inject": True, "cuda_graphs": True,
                  "max_model_len": 2 ** (args.prompt_tokens + args.new_tokens + 16).bit_length()},
        "batching": {"max_batch_size": args.concurrency, "max_wait_ms": 2.0, "max_queue": 1024,
                     "max_tokens_in_flight": 1 << 20},
        "limits": {"request_timeout_s": 600, "drain_timeout_s": 30}}, "telemetry": telemetry}


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# -- load ---------------------------------------------------------------------------------------------------
class TraceIds:
    """Trace ids for one mode's requests: exactly ``ratio`` of them inside the kernel ratio
    (stratified: one at a random place in every block of 1/ratio), or drawn at random."""

    def __init__(self, ratio: float, stratified: bool, rng: random.Random) -> None:
        self._ratio = ratio
        self._stratified = stratified and 0.0 < ratio < 1.0
        self._rng = rng
        self._block = max(1, round(1 / ratio)) if self._stratified else 1
        self._index = 0
        self._pick = 0
        self.inside = 0

    def next(self) -> int:
        if not self._stratified:
            return self._rng.getrandbits(128)
        i, self._index = self._index % self._block, self._index + 1
        if i == 0:
            self._pick = self._rng.randrange(self._block)
        limit = round(self._ratio * _LOW)
        low = self._rng.randrange(0, limit) if i == self._pick else self._rng.randrange(limit, _LOW)
        self.inside += i == self._pick
        return (self._rng.getrandbits(64) << 64) | low


def traceparent(trace_id: int) -> str:
    return f"00-{trace_id:032x}-{random.getrandbits(64):016x}-01"


async def generated_tokens(session, port: int) -> tuple[float, float]:
    """The server's generated-tokens counter, and when it was read."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        body = await resp.read()
    at = time.perf_counter()
    found = TOKENS_METRIC.search(body)
    if found is None:
        raise RuntimeError("kernelgate_inference_generated_tokens_total not in /metrics")
    return float(found.group(1)), at


def process_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system, all its threads) the process has used so far; 0 when unknown.
    The server's own, not its span export child's: what tracing takes from the serving process."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def window(port: int, args: argparse.Namespace, prompts: list[list[int]], ids: TraceIds,
                 pid: int | None = None) -> dict[str, Any]:
    """Closed-loop clients for ramp + window; tokens/s from the server's counter over the window, and
    the server process's CPU time over it per 1000 tokens."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    stop = False
    requests = 0

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal requests
        i = index
        while not stop:
            body = {"model": args.model, "prompt": prompts[i % len(prompts)], "max_tokens": args.new_tokens,
                    "temperature": 0, "ignore_eos": True}
            async with session.post(url, json=body, headers={"traceparent": traceparent(ids.next())}) as resp:
                got = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {got}")
            requests += 1
            i += args.concurrency

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        clients = [asyncio.create_task(client(session, i)) for i in range(args.concurrency)]
        await asyncio.sleep(args.ramp_s)
        tokens0, t0 = await generated_tokens(session, port)
        cpu0 = process_cpu_s(pid)
        requests0 = requests
        await asyncio.sleep(args.window_s)
        tokens1, t1 = await generated_tokens(session, port)
        cpu1 = process_cpu_s(pid)
        requests1 = requests
        stop = True
        await asyncio.gather(*clients)
    return {"tokens_per_s": round((tokens1 - tokens0) / (t1 - t0), 1), "tokens": int(tokens1 - tokens0),
            "seconds": round(t1 - t0, 3), "requests_finished": requests1 - requests0,
            "server_cpu_ms_per_1k_tokens": round((cpu1 - cpu0) * 1e6 / max(tokens1 - tokens0, 1), 2)}


async def forced_request(port: int, args: argparse.Namespace, prompt: list[int], trace_id: int) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/v1/completions",
                                json={"model": args.model, "prompt": prompt, "max_tokens": 32, "temperature": 0,
                                      "ignore_eos": True},
                                headers={"traceparent": traceparent(trace_id), FORCE_HEADER: "1"}) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {body}")
            return body


# -- statistics ------------------------------------------------------------------------------------------------
def pooled_loss(pairs_by_run: list[list[tuple[float, float]]], draws: int = 4000, seed: int = 7) -> dict[str, Any]:
    """Tokens/s lost (%) pooled over rounds, ``(baseline, mode)`` tokens/s per round, grouped by run:
    100 * (sum of baseline - sum of mode) / sum of baseline, with a bootstrap 90 % interval
    (rounds resampled with replacement within each run), and a second one with the runs resampled
    as well (``interval90_runs_resampled``)."""
    pairs = [p for run in pairs_by_run for p in run]
    if not pairs:
        raise ValueError("no rounds")

    def loss(sample: list[tuple[float, float]]) -> float:
        base = sum(a for a, _ in sample)
        return 100.0 * (base - sum(b for _, b in sample)) / base

    def interval(resample: Callable[[], list[tuple[float, float]]]) -> tuple[float, float]:
        boot = sorted(loss(resample()) for _ in range(draws))
        return boot[int(0.05 * draws)], boot[int(math.ceil(0.95 * draws)) - 1]

    rng = random.Random(seed)
    lo, hi = interval(lambda: [p for run in pairs_by_run for p in (rng.choice(run) for _ in run)])
    # Runs resampled too (then rounds within each drawn run): the interval a run-to-run difference
    # (another host, another lease) widens, which resampling rounds within fixed runs cannot show.
    runs_lo, runs_hi = interval(lambda: [p for run in (rng.choice(pairs_by_run) for _ in pairs_by_run)
                                         for p in (rng.choice(run) for _ in run)])
    per_round = [100.0 * (a - b) / a for a, b in pairs]
    return {"overhead_pct": round(loss(pairs), 2), "interval90": [round(lo, 2), round(hi, 2)],
            "interval90_runs_resampled": [round(runs_lo, 2), round(runs_hi, 2)],
            "halfwidth": round((hi - lo) / 2, 2), "rounds": len(pairs), "runs": len(pairs_by_run),
            "per_round_median": round(statistics.median(per_round), 2),
            "per_round_sd": round(statistics.stdev(per_round), 2) if len(per_round) > 1 else None}


# -- reading the trace back ------------------------------------------------------------------------------
def read_traces(spans_path: Path) -> dict[str, Any]:
    from otel.otlp_file import read_otlp_file
    from tests.jaeger import parse_otlp

    return parse_otlp(*read_otlp_file(spans_path))


def inspect_trace(traces: dict[str, Any], trace_id: str) -> dict[str, Any]:
    trace = traces.get(trace_id)
    if trace is None:
        raise RuntimeError(f"trace {trace_id} not in the spans file")
    request = trace.one(REQUEST_SPAN)
    steps = sorted(trace.named(names.STEP_SPAN), key=lambda s: s.start_ns)
    forwards = sorted(trace.named(names.FORWARD_SPAN), key=lambda s: s.start_ns)
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
            "source": a.get(names.KERNELS_SOURCE), "graph_key": a.get(names.KERNELS_GRAPH_KEY),
            "derived_from_step": a.get(names.KERNELS_DERIVED_FROM_STEP),
            "replay_us": round(a[names.KERNELS_REPLAY_NS] / 1000, 1) if names.KERNELS_REPLAY_NS in a else None,
            "phase": a.get(names.STEP_PHASE), "step_index": a.get(names.STEP_INDEX),
            "batch_size": a.get(names.STEP_BATCH_SIZE), "recorder": a.get(names.KERNELS_RECORDER),
            "parent": trace.parent(forward).name if trace.parent(forward) else None,
            "kernel_spans": len(kernels), "kernels_captured": a.get(names.KERNELS_COUNT),
            "folded": a.get(names.KERNELS_FOLDED), "dropped": a.get(names.KERNELS_DROPPED),
            "kernels_clamped": a.get(names.KERNELS_CLAMPED),
            "gpu_time_us": round(a.get(names.KERNELS_GPU_TIME_NS, 0) / 1000, 1),
            "clock_uncertainty_us": round(a.get(names.CLOCK_UNCERTAINTY_NS, 0) / 1000, 1),
            "forward_us": round((forward.end_ns - forward.start_ns) / 1000, 1),
            "all_kernels_inside_parent": all(forward.start_ns <= k.start_ns <= k.end_ns <= forward.end_ns
                                             for k in kernels)})
    return {"trace": trace, "request": request, "steps": steps, "forwards": forwards, "per_forward": per_forward,
            "outside": outside}


def spans_by_source(traces: dict[str, Any]) -> dict[str, Any]:
    """Every ``gpu.forward`` of the spans file by source (recorded, derived), the kernel spans under
    them, and whether each kernel span lies inside its ``gpu.forward`` and each ``gpu.forward``
    under an ``engine.step`` or request span and inside it."""
    out: dict[str, Any] = {}
    outside = 0
    parents: dict[str, int] = {}
    for trace in traces.values():
        for forward in trace.named(names.FORWARD_SPAN):
            source = str(forward.attributes.get(names.KERNELS_SOURCE, "recorded"))
            row = out.setdefault(source, {"forwards": 0, "kernel_spans": 0, "kernels": 0})
            kernels = trace.children(forward)
            row["forwards"] += 1
            row["kernel_spans"] += len(kernels)
            row["kernels"] += forward.attributes.get(names.KERNELS_COUNT, 0)
            parent = trace.parent(forward)
            parents[parent.name if parent else "none"] = parents.get(parent.name if parent else "none", 0) + 1
            if parent is None or not parent.start_ns <= forward.start_ns <= forward.end_ns <= parent.end_ns:
                outside += 1
            outside += sum(not forward.start_ns <= k.start_ns <= k.end_ns <= forward.end_ns for k in kernels)
    return {**out, "forward_parents": parents, "spans_outside_parent": outside,
            "all_inside_parent": outside == 0 and bool(out)}


def capture_timing(traces: dict[str, Any]) -> dict[str, Any]:
    """Every captured pass of the run: its step's duration against the unprofiled steps of the
    same phase, and where the time went inside it (before the first kernel, the largest gap
    between kernels)."""
    steps = {s.span_id: s for t in traces.values() for s in t.spans if s.name == names.STEP_SPAN}
    profiled: set[str] = set()
    passes = []
    for trace in traces.values():
        for forward in trace.named(names.FORWARD_SPAN):
            profiled.update(link.span_id for link in forward.links)
            profiled.add(forward.parent_id)
            starts = sorted((k.start_ns, k.end_ns, k.name) for k in trace.children(forward))
            if not starts:
                continue
            gaps = [(b[0] - a[0], b[2]) for a, b in zip(starts, starts[1:])]
            gap, before = max(gaps, default=(0, ""))
            passes.append({"phase": forward.attributes.get(names.STEP_PHASE),
                           "first_kernel_us": (starts[0][0] - forward.start_ns) / 1e3,
                           "last_kernel_end_us": (max(e for _, e, _ in starts) - forward.start_ns) / 1e3,
                           "largest_gap_us": gap / 1e3, "largest_gap_before": before})
    out: dict[str, Any] = {"captured_passes": len(passes)}
    for phase in ("prefill", "decode"):
        for label, want in (("profiled", True), ("unprofiled", False)):
            durations = [(s.end_ns - s.start_ns) / 1e3 for sid, s in steps.items()
                         if s.attributes.get(names.STEP_PHASE) == phase and (sid in profiled) == want]
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
    forward_parents = {f.parent_id for f in found["forwards"]}
    keep_steps = {s.span_id for s in found["steps"][:steps_shown]} | forward_parents
    keys = (names.GEN_AI_REQUEST_MODEL, names.GEN_AI_REQUEST_MAX_TOKENS, names.GEN_AI_USAGE_INPUT_TOKENS,
            names.GEN_AI_USAGE_OUTPUT_TOKENS, names.KERNELS_CAPTURE, names.STEP_PHASE, names.STEP_INDEX,
            names.STEP_BATCH_SIZE, names.KERNELS_COUNT, names.KERNELS_FOLDED, names.KERNELS_RECORDER,
            names.GPU_KERNEL_NAME, names.KERNEL_COUNT, names.GPU_STREAM)
    out = []

    def row(span, depth: int) -> dict:
        return {"depth": depth, "name": span.name, "service": span.service,
                "start_us": round((span.start_ns - t0) / 1000, 1),
                "duration_us": round((span.end_ns - span.start_ns) / 1000, 1),
                "attributes": {k: (v[:120] if isinstance(v, str) else v) for k, v in span.attributes.items()
                               if k in keys},
                **({"links": len(span.links)} if span.links else {})}

    def walk(span, depth: int) -> None:
        out.append(row(span, depth))
        children = trace.children(span)
        if span.name == names.FORWARD_SPAN and len(children) > kernels_per_forward:
            for child in children[:kernels_per_forward]:
                out.append(row(child, depth + 1))
            out.append({"depth": depth + 1, "name": f"... {len(children) - kernels_per_forward} more kernel spans"})
            return
        for child in children:
            if child.name == names.STEP_SPAN and child.span_id not in keep_steps:
                continue
            walk(child, depth + 1)

    walk(request, 0)
    if len(found["steps"]) > len(keep_steps):
        out.append({"depth": 1, "name": f"... {len(found['steps']) - len(keep_steps)} more engine.step spans"})
    return out


# -- running ------------------------------------------------------------------------------------------------
@dataclass
class ModeServer:
    """One mode's server in one run, from start to the kernel tracer's counters it leaves behind."""

    mode: Mode
    run: int
    proc: subprocess.Popen
    port: int
    config_path: Path
    spans_path: Path
    ids: TraceIds
    info: dict[str, Any] = field(default_factory=dict)

    def measure(self, args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
        return asyncio.run(window(self.port, args, prompts, self.ids, self.proc.pid))

    def force_example(self, args: argparse.Namespace, prompts: list[list[int]]) -> list[str]:
        """Two requests forced to a kernel trace, one after the other, to read back from the spans file:
        the first one's decode pass is recorded unless its graph's replay was recorded already, the
        second one's is then derived from it."""
        trace_ids = []
        for _ in range(2):
            trace_id = random.getrandbits(128)
            self.info["example_response"] = asyncio.run(forced_request(self.port, args, prompts[0], trace_id))["usage"]
            trace_ids.append(f"{trace_id:032x}")
            time.sleep(0.5)  # its recorded pass becomes the graph's template
        time.sleep(1.5)  # one export interval
        return trace_ids

    def stop(self) -> dict[str, Any]:
        stop_server(self.proc)
        stats_path = Path(str(self.config_path) + ".kernels.json")
        if stats_path.exists():
            self.info["kernel_tracer"] = json.loads(stats_path.read_text())
        self.info["trace_ids_inside_ratio"] = self.ids.inside
        return self.info


def start_servers(modes: list[Mode], args: argparse.Namespace, run: int, rng: random.Random) -> dict[str, ModeServer]:
    """Every mode's server of one run, started at once (model load and graph capture overlap)."""
    import yaml

    work, log_dir = Path(args.work_dir), Path(args.log_dir)
    work.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = []
    for mode in modes:
        port = free_port()
        spans_path = spans_file(args, run, mode)
        spans_path.unlink(missing_ok=True)
        config_path = work / f"server-{run}-{mode.slug}.yaml"
        config_path.write_text(yaml.safe_dump(server_config(mode, args, port, spans_path)))
        stem = f"server-{run}-{mode.slug}"
        proc = start(stem, [sys.executable, __file__, "--serve", str(config_path)], log_dir,
                     env={"PYTHONUNBUFFERED": "1"})
        pending.append((mode, proc, port, config_path, spans_path))
    servers: dict[str, ModeServer] = {}
    try:
        for mode, proc, port, config_path, spans_path in pending:
            wait_http(f"http://127.0.0.1:{port}/readyz", timeout=args.ready_timeout, proc=proc)
            server = ModeServer(mode, run, proc.popen, port, config_path, spans_path,
                                TraceIds(mode.ratio, args.trace_ids == "stratified", rng))
            log = proc.log_path.read_text()
            ready = re.search(r"ready \((\S+) backend.*CUDA graphs (on|off)", log)
            server.info["backend"], server.info["cuda_graphs"] = ready.groups() if ready else ("unknown", "unknown")
            servers[mode.name] = server
    except BaseException:
        for _, proc, *_ in pending:
            proc.popen.kill()
        raise
    return servers


def main() -> int:
    args = parse_args()
    if args.serve:
        return serve_child(args.serve)
    modes = [parse_mode(m, args.kernel_ratio) for m in args.modes.split(",")]
    if args.export_process:
        modes = [replace(m, export_process=True) if m.telemetry else m for m in modes]
    if modes[0].name != "off" or "on" not in [m.name for m in modes]:
        raise SystemExit("--modes: the first mode is off (the baseline), and on is one of them")
    prior_runs, prior = load_pooled(args)
    if args.pool_only:
        if prior is None or not prior_runs:
            raise SystemExit("--pool-only: give --pool-with results to pool")
        return write_result(args, modes, prior_runs, {k: prior.get(k) for k in EXAMPLE_KEYS}, prior["device"],
                            prior["versions"], 0.0)
    import torch

    from inference.model_configs import random_config

    random.seed(1)
    rng = random.Random(2)
    vocab = random_config(args.model).vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, min(vocab, 50000), (256, args.prompt_tokens), generator=gen).tolist()

    def on_pairs(rounds: list[dict[str, dict]]) -> list[tuple[float, float]]:
        return [(r["off"]["tokens_per_s"], r["on"]["tokens_per_s"]) for r in rounds if "on" in r]

    began = time.monotonic()
    runs: list[dict[str, Any]] = []
    example: dict[str, Any] = {}
    traces: dict[str, Any] = {}
    for run in range(args.runs):
        servers = start_servers(modes, args, run, rng)
        measuring = time.monotonic()
        rounds: list[dict[str, dict]] = []
        failed: dict[str, str] = {}
        try:
            last_run = run == args.runs - 1
            warmup = []
            for _ in range(args.warmup_rounds):
                warmup.append({m.name: servers[m.name].measure(args, prompts) for m in modes})
                print(f"[run {run} warm-up] " + "  ".join(f"{n} {w['tokens_per_s']}" for n, w in warmup[-1].items()),
                      flush=True)
            while len(rounds) < (args.max_rounds if last_run else args.min_rounds):
                order = modes if len(rounds) % 2 == 0 else modes[::-1]
                measured_round: dict[str, dict] = {}
                for m in order:
                    if m.name in failed:
                        continue
                    try:
                        measured_round[m.name] = servers[m.name].measure(args, prompts)
                    except Exception as exc:  # noqa: BLE001 - an experimental mode may die; the others go on
                        if m.name in ("off", "on"):
                            raise
                        failed[m.name] = f"{type(exc).__name__}: {exc}"[-3000:]
                        print(f"[run {run}] mode {m.name} failed: {failed[m.name]}", flush=True)
                rounds.append(measured_round)
                print(f"[run {run} round {len(rounds)}] " + "  ".join(
                    f"{name} {w['tokens_per_s']}" for name, w in measured_round.items()), flush=True)
                if last_run and len(rounds) >= args.min_rounds:
                    now = pooled_loss([on_pairs(done["rounds"]) for done in prior_runs + runs] + [on_pairs(rounds)])
                    print(f"  on, pooled: {now['overhead_pct']} % [{now['interval90'][0]}, {now['interval90'][1]}]",
                          flush=True)
                    if now["halfwidth"] <= args.target_halfwidth:
                        break
                measured = sum(done["measuring_s"] for done in runs) + time.monotonic() - measuring
                if args.time_budget_s and len(rounds) >= args.min_rounds and measured > args.time_budget_s:
                    break
            if last_run:
                example["trace_ids"] = servers["on"].force_example(args, prompts)
        finally:
            infos = {name: server.stop() for name, server in servers.items()}
        runs.append({"run": run, "measuring_s": round(time.monotonic() - measuring, 1), "rounds": rounds,
                     "warmup_rounds": warmup, "servers": infos, "failed_modes": failed,
                     "tokens_per_s": {m.name: round(statistics.fmean(r[m.name]["tokens_per_s"] for r in rounds
                                                                     if m.name in r), 1)
                                      for m in modes if any(m.name in r for r in rounds)}})
        if run == args.runs - 1:
            traces = read_traces(servers["on"].spans_path)

    examples = [inspect_trace(traces, trace_id) for trace_id in example["trace_ids"]]
    found = examples[-1]  # the second forced request: derived, once the first recorded its graph's replay
    per_forward = [f for e in examples for f in e["per_forward"]]
    last = runs[-1]["servers"]["on"]
    example_fields = {
        "backend": last.get("backend"), "cuda_graphs": last.get("cuda_graphs"),
        "kernel_spans": sum(f["kernel_spans"] for f in per_forward),
        "kernel_recorder": sorted({str(f["recorder"]) for f in per_forward}),
        "kernel_spans_by_forward": per_forward,
        "kernel_spans_inside_parent": all(f["all_kernels_inside_parent"] for f in per_forward) and bool(per_forward),
        "spans_outside_parent": [line for e in examples for line in e["outside"]][:20],
        "example_trace_id": example["trace_ids"][-1],
        "example_trace_ids": example["trace_ids"],
        "example_trace": trimmed_example(found),
        "kernel_spans_by_source": spans_by_source(traces),
        "capture_timing": capture_timing(traces)}
    versions = {"torch": torch.__version__}
    for name in ("transformers", "deepspeed", "opentelemetry.sdk.version", "cupti"):
        try:
            module = __import__(name, fromlist=["__version__"])
            versions[name.split(".")[0]] = getattr(module, "__version__", "installed")
        except Exception:  # noqa: BLE001 - report what is importable
            versions[name.split(".")[0]] = None
    device = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    return write_result(args, modes, prior_runs + runs, example_fields, device, versions,
                        round(time.monotonic() - began, 1))


def earlier_code(path: str) -> dict[str, Any]:
    """An earlier result's curve and losses, kept beside this one's (``--earlier``): the rows this run
    did not measure, from the code it ran, labelled with the command that made them."""
    prior = json.loads(Path(path).read_text())
    keep = ("description", "kernel_ratio", "overhead_pct", "interval90", "interval90_runs_resampled", "halfwidth",
            "rounds")
    return {"file": path, "command": prior["command"], "device": prior["device"],
            "note": "measured before engine.step/queue spans were built off the engine thread (otel/deferred.py); "
                    "not pooled with this run",
            "cost_curve": prior.get("cost_curve"),
            "cost_by_mode": {m: {k: v for k, v in row.items() if k in keep}
                             for m, row in prior.get("cost_by_mode", {}).items()}}


# What the traced example request and the device are, taken as a whole from one run (--pool-only: the last).
EXAMPLE_KEYS = ("backend", "cuda_graphs", "kernel_spans", "kernel_recorder", "kernel_spans_by_forward",
                "kernel_spans_inside_parent", "spans_outside_parent", "example_trace_id", "example_trace_ids",
                "example_trace", "kernel_spans_by_source", "capture_timing")


def load_pooled(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The runs of ``--pool-with`` results, and the last of those results. A run written before this
    script set warm-up rounds apart gets its first ``--warmup-rounds`` rounds set apart the same way."""
    runs: list[dict[str, Any]] = []
    last = None
    for earlier in args.pool_with:
        prior = json.loads(Path(earlier).read_text())
        for key in ("model", "concurrency", "prompt_tokens", "new_tokens", "kernel_ratio"):
            if prior[key] != getattr(args, key):
                raise SystemExit(f"--pool-with {earlier}: {key} {prior[key]!r}, this run {getattr(args, key)!r}")
        for run in prior["runs"]:
            run = dict(run, pooled_from=run.get("pooled_from", earlier))
            if "warmup_rounds" not in run:
                run["warmup_rounds"] = run["rounds"][:args.warmup_rounds]
                run["rounds"] = run["rounds"][args.warmup_rounds:]
                run["warmup_set_apart_when_pooled"] = True
            runs.append(run)
        if all(k in prior for k in EXAMPLE_KEYS):
            last = prior
    return runs, last


def write_result(args: argparse.Namespace, modes: list[Mode], runs: list[dict[str, Any]], example: dict[str, Any],
                 device: str, versions: dict[str, Any], seconds: float) -> int:
    """Pool every run's rounds per mode, write the result file, print its summary."""
    from otel.config import KernelTraceConfig, TelemetryConfig

    for index, run in enumerate(runs):
        run["run"] = index

    def pairs(mode: str) -> list[list[tuple[float, float]]]:
        return [[(r["off"]["tokens_per_s"], r[mode]["tokens_per_s"]) for r in run["rounds"] if mode in r]
                for run in runs if any(mode in r for r in run["rounds"])]

    measured = list(modes)  # and the modes only earlier runs measured
    for run in runs:
        for name in sorted({name for r in run["rounds"] for name in r}):
            if name not in [m.name for m in measured]:
                measured.append(parse_mode(name, args.kernel_ratio))
    measured = [m for m in measured if m.name == "off" or pairs(m.name)]  # a mode that died before a round: none
    losses = {m.name: pooled_loss(pairs(m.name)) for m in measured[1:]}
    headline = losses["on"]

    def recorder_ms(stats: list[dict[str, Any]]) -> dict[str, float]:
        """The recorder's breakdown (CuptiCapture.timings) per capture, over all runs."""
        total: dict[str, int] = {}
        for s in stats:
            for key, value in (s.get("recorder") or {}).items():
                total[key] = total.get(key, 0) + value
        n = max(total.pop("captures", 0), 1)
        return {key.removesuffix("_ns"): round(value / 1e6 / n, 2) for key, value in total.items()}

    def tracer_stats(mode: str) -> dict[str, Any]:
        """A mode's kernel tracer over the runs that kept its counters, per profiled pass and per second."""
        mine = [run for run in runs if (run["servers"].get(mode) or {}).get("kernel_tracer")]
        stats = [run["servers"][mode]["kernel_tracer"] for run in mine]
        total = {k: sum(s.get(k, 0) for s in stats) for k in ("selected", "captures", "engine_thread_ns",
                                                              "engine_start_ns", "worker_ns", "prepare_ns",
                                                              "prepares", "releases", "budget_refused",
                                                              "dropped_captures", "failures", "derived",
                                                              "derived_spans", "templates", "exported_spans",
                                                              "derived_engine_ns")}
        windows = [w for run in mine for r in run["rounds"] + run.get("warmup_rounds", []) for w in [r.get(mode)] if w]
        seconds = sum(w["seconds"] + args.ramp_s for w in windows)
        captures = max(total["captures"], 1)
        return {**total, "runs": len(mine), "captures_per_s": round(total["captures"] / seconds, 2) if seconds else None,
                "derived_per_s": round(total["derived"] / seconds, 2) if seconds else None,
                "requests_finished_in_windows": sum(w["requests_finished"] for w in windows),
                "trace_ids_inside_ratio": sum(run["servers"][mode].get("trace_ids_inside_ratio", 0) for run in mine),
                # recorded passes (the recorder's start and stop); derived ones apart
                "engine_thread_ms_per_profiled_pass": round(
                    (total["engine_thread_ns"] - total["derived_engine_ns"]) / 1e6 / captures, 2),
                "engine_thread_us_per_derived_pass": round(total["derived_engine_ns"] / 1e3 / max(total["derived"], 1),
                                                           1),
                "engine_thread_start_ms_per_profiled_pass": round(total["engine_start_ns"] / 1e6 / captures, 2),
                "prepare_ms_per_attach": round(total["prepare_ns"] / 1e6 / max(total["prepares"], 1), 2),
                "worker_ms_per_profiled_pass": round(total["worker_ns"] / 1e6 / captures, 2),
                "budget_cost_ms": round(stats[-1].get("budget_cost_ns", 0) / 1e6, 2) if stats else None,
                "recorder_ms_per_capture": recorder_ms(stats)}

    config = KernelTraceConfig()
    result = {
        "command": "python3 " + " ".join(shlex.quote(a) for a in sys.argv),
        "device": device,
        "versions": versions,
        "model": args.model, "backend": example["backend"], "cuda_graphs": example["cuda_graphs"],
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "concurrency": args.concurrency,
        "overhead_pct": headline["overhead_pct"],
        "overhead_pct_interval90": headline["interval90"],
        "overhead": headline,
        "kernel_ratio": args.kernel_ratio,
        "head_sampling": 1.0,
        # the server process's CPU time per 1000 tokens, median over windows (its export child not
        # included): the GIL-side cost of each mode, less noisy than tokens/s on a shared host
        "server_cpu_ms_per_1k_tokens": {m.name: statistics.median(cpu) for m in measured for cpu in [[
            r[m.name]["server_cpu_ms_per_1k_tokens"] for run in runs for r in run["rounds"]
            if m.name in r and "server_cpu_ms_per_1k_tokens" in r[m.name]]] if cpu},
        "cost_by_mode": {m.name: {"description": m.describe(), "kernel_ratio": m.ratio if m.telemetry else None,
                                  **losses[m.name], **({"kernel_tracer": tracer_stats(m.name)} if m.telemetry and any(
                                      (run["servers"].get(m.name) or {}).get("kernel_tracer") for run in runs) else {})}
                         for m in measured[1:]},
        # [kernel ratio, loss, interval, mode]: the modes that differ from on only by their ratio
        # (and by whether spans are exported by a child process: the last field says)
        "cost_curve": sorted(([m.ratio, losses[m.name]["overhead_pct"], losses[m.name]["interval90"], m.name]
                              for m in measured[1:] if m.telemetry and m.stall_budget_pct is None and m.derive
                              and m.prepare_ahead and m.decode_every == 16), key=lambda x: (x[3].endswith(("+export", "+inproc")), x[0])),
        **{k: v for k, v in example.items() if k not in ("backend", "cuda_graphs")},
        "measurement": {"runs": len(runs), "rounds": [len(r["rounds"]) for r in runs],
                        "warmup_rounds": [len(r.get("warmup_rounds", [])) for r in runs],
                        "window_s": args.window_s, "ramp_s": args.ramp_s, "trace_ids": args.trace_ids,
                        "pooled_with": args.pool_with, "target_halfwidth": args.target_halfwidth, "seconds": seconds,
                        "tokens": "the server's kernelgate_inference_generated_tokens counter over each window",
                        "interval": "bootstrap 90 %, rounds resampled within runs, 4000 draws"},
        "kernels_config": {"max_captures_per_minute": args.max_captures_per_minute,
                           "stall_budget_pct": args.stall_budget_pct,
                           "stall_budget_pct_default": config.stall_budget_pct,
                           "steps_per_request": args.steps_per_request or config.steps_per_request,
                           "derive": config.derive, "derive_refresh_s": config.derive_refresh_s,
                           "capture": args.capture},
        "exporter": "OTLP protobuf file (otel/otlp_file.py: same encoding as OTLP/gRPC), BatchSpanProcessor, 0.5 s delay"
                    + ("; every traced mode through the export process (--export-process)" if args.export_process
                       else "; each mode's description says where (the config's default: "
                       + ("a child process" if TelemetryConfig().export_process else "the server process") + ")"),
        **({"earlier_code": earlier_code(args.earlier)} if args.earlier else {}),
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("example_trace", "runs", "kernel_spans_by_forward")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
