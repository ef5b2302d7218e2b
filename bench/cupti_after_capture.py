"""Does one kernel capture slow the forward passes that come after it? (issue #4 diagnostic)

Builds the server's model path (``load_model`` + ``ModelRunner``: random-weight model, HF
backend, CUDA graphs for decode) in a child process per variant, then times batch-16 decode
steps (CUDA graph replay) and batch-1 eager prefills before and after captures made with
``otel.kernels.torch_capture.TorchProfilerCapture`` as the engine makes them (start, one forward pass, stop),
and what each capture cost: start, stop, and the worker's parse; each capture's kernels are
checked to map (through the clock anchor) inside the wall-clock window around it.

The variants differ in the environment the child starts with (Kineto's ``TEARDOWN_CUPTI``:
whether CUPTI is detached after a trace; ``kernelgate`` leaves it to ``TorchProfilerCapture``)
and in whether a capture starts right after the previous one or waits for ``ready()``.

    python3 bench/cupti_after_capture.py --out bench/results/cupti_after_capture.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (environment: "-" removes the variable, capture schedule). Schedule: groups separated by
# ",", timed after each group; in a group, P = a profiled prefill, D = a profiled graph decode step,
# back to back as a request's first passes are, or after "|": unprofiled graph decode steps until
# the capture is ready() again, as the engine does.
VARIANTS: dict[str, tuple[dict[str, str], str]] = {
    "control": ({"TEARDOWN_CUPTI": "0"}, ""),
    "no_teardown": ({"TEARDOWN_CUPTI": "0"}, "P|D,P|D"),
    "teardown_back_to_back": ({"TEARDOWN_CUPTI": "1"}, "PD,PD"),
    "kernelgate": ({"TEARDOWN_CUPTI": "-"}, "P|D,P|D"),  # whatever TorchProfilerCapture decides
    # T: the start split in two, its CUPTI set-up (_prepare_profiler) on another thread while this
    # one runs graph steps: does it hold the GIL, what does each half cost?
    "prepare_elsewhere": ({"TEARDOWN_CUPTI": "-"}, "P|T|T"),
    # as kernelgate, with the model built and run on a thread other than the main one, as the
    # server's engine thread does
    "kernelgate_engine_thread": ({"TEARDOWN_CUPTI": "-", "CUPTI_DIAG_THREAD": "1"}, "P|D,P|D"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-medium")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--decode-steps", type=int, default=60, help="per timing chunk; a round is the median of 5")
    p.add_argument("--prefills", type=int, default=10, help="per timing chunk; a round is the median of 3")
    p.add_argument("--timeout", type=float, default=240.0)
    p.add_argument("--out", default=str(ROOT / "bench/results/cupti_after_capture.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--schedule", default="PD", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the child: one model, timings around captures --------------------------------------------------------
def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.pass_timing import PassTimer
    from otel.kernels.torch_capture import TorchProfilerCapture

    cuda = args.device == "cuda"
    out: dict[str, Any] = {}
    with torch.inference_mode():
        timer = PassTimer.build(args.model, args.device, args.batch, args.prompt_tokens,
                                decode_steps=args.decode_steps, prefills=args.prefills)
        out["graphs"] = timer.graphs
        graph_step, prefill, bench = timer.graph_step, timer.prefill, timer.bench
        rounds: list[dict[str, Any]] = [{"after": "nothing", **bench()}, {"after": "nothing (again)", **bench()}]
        capture = TorchProfilerCapture("cuda" if cuda else "cpu")
        out["TEARDOWN_CUPTI_in_child"] = os.environ.get("TEARDOWN_CUPTI")
        costs = []
        for group in filter(None, args.schedule.split(",")):
            pending = []
            waited = 0
            for which in group:
                if which == "T":
                    costs.append(prepare_elsewhere(capture, graph_step, prefill))
                    continue
                if which == "|":
                    while not capture.ready():
                        graph_step()
                        waited += 1
                    continue
                t0 = time.perf_counter_ns()
                wall0 = time.time_ns()
                capture.start()
                t1 = time.perf_counter_ns()
                (prefill if which == "P" else graph_step)()
                t2 = time.perf_counter_ns()
                raw = capture.stop()
                t3 = time.perf_counter_ns()
                costs.append({"pass": which, "start_ms": round((t1 - t0) / 1e6, 2),
                              "forward_ms": round((t2 - t1) / 1e6, 2), "stop_ms": round((t3 - t2) / 1e6, 2),
                              "unprofiled_steps_before": waited})
                pending.append((raw, (wall0, time.time_ns()), costs[-1]))
                waited = 0
            for raw, (lo, hi), cost in pending:  # parsed afterwards, as by the worker
                t3 = time.perf_counter_ns()
                try:
                    events, anchor = capture.events(raw)
                except ValueError as exc:
                    cost["parse_error"] = str(exc)
                    continue
                t4 = time.perf_counter_ns()
                walls = [(anchor.to_wall(e.start_ns), anchor.to_wall(e.end_ns)) for e in events]
                cost.update({"parse_ms": round((t4 - t3) / 1e6, 2), "kernels": len(events),
                             "anchor_uncertainty_us": round(anchor.uncertainty_ns / 1e3, 1),
                             "profiler_minus_wall_clock_us": round((anchor.profiler_ns - anchor.wall_ns) / 1e3, 1),
                             "kernels_inside_wall_window": all(lo <= a <= b <= hi for a, b in walls)})
            rounds.append({"after": f"captures {group}", **bench()})
        time.sleep(2.0)
        rounds.append({"after": "2 s idle", **bench()})
    out["captures"] = costs
    out["rounds"] = rounds
    base = rounds[0]
    last = rounds[-1]
    out["slowdown_pct_after_captures"] = {
        k: round(100.0 * (last[k] - base[k]) / base[k], 1) for k in ("graph_decode_ms", "eager_prefill_ms")}
    return out


def prepare_elsewhere(capture: Any, graph_step: Any, prefill: Any) -> dict[str, Any]:
    import threading

    from torch.autograd import _enable_profiler, _prepare_profiler

    took: list[int] = []

    def prepare() -> None:
        began = time.perf_counter_ns()
        _prepare_profiler(capture._config, capture._kinds)  # noqa: SLF001
        took.append(time.perf_counter_ns() - began)

    thread = threading.Thread(target=prepare)
    steps, began = 0, time.perf_counter_ns()
    thread.start()
    while thread.is_alive():
        graph_step()
        steps += 1
    during = time.perf_counter_ns() - began
    t0 = time.perf_counter_ns()
    _enable_profiler(capture._config, capture._kinds)  # noqa: SLF001
    capture._readings = []  # noqa: SLF001 - what start() does after enabling
    for _ in range(3):
        before = time.time_ns()
        capture._mark()  # noqa: SLF001
        capture._readings.append((before, time.time_ns()))  # noqa: SLF001
    t1 = time.perf_counter_ns()
    prefill()
    raw = capture.stop()
    events, anchor = capture.events(raw)
    return {"pass": "T", "prepare_ms_other_thread": round(took[0] / 1e6, 2),
            "graph_steps_meanwhile": steps, "ms_per_graph_step_meanwhile": round(during / 1e6 / max(steps, 1), 3),
            "enable_ms": round((t1 - t0) / 1e6, 2), "kernels": len(events),
            "anchor_uncertainty_us": round(anchor.uncertainty_ns / 1e3, 1)}


# -- the parent: one child per variant ------------------------------------------------------------------------
def run_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    variables, schedule = VARIANTS[name]
    for key, value in variables.items():
        if value == "-":
            env.pop(key, None)
        else:
            env[key] = value
    cmd = [sys.executable, __file__, "--child", name, "--model", args.model, "--device", args.device,
           "--batch", str(args.batch), "--prompt-tokens", str(args.prompt_tokens), "--schedule", schedule,
           "--decode-steps", str(args.decode_steps), "--prefills", str(args.prefills)]
    began = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"env": variables, "schedule": schedule, "error": f"timed out after {args.timeout}s"}
    result: dict[str, Any] = {"env": variables, "schedule": schedule, "rc": proc.returncode, "wall_s": round(time.monotonic() - began, 1)}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        result["error"] = proc.stderr[-2000:]
    else:
        result.update(json.loads(lines[-1][len("RESULT "):]))
    return result


def main() -> int:
    args = parse_args()
    if args.child:
        if os.environ.get("CUPTI_DIAG_THREAD") == "1":
            import threading

            box: list[dict[str, Any]] = []
            engine = threading.Thread(target=lambda: box.append(child(args)), name="engine")
            engine.start()
            engine.join()
            print("RESULT " + json.dumps(box[0]), flush=True)
        else:
            print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    import torch

    variants = {}
    for name in args.variants.split(","):
        variants[name] = run_variant(name, args)
        v = variants[name]
        print(f"[{name}] " + json.dumps({k: v.get(k) for k in ("rc", "wall_s", "slowdown_pct_after_captures",
                                                               "error")}), flush=True)
        for r in v.get("rounds", []):
            print("   ", json.dumps(r), flush=True)
        for c in v.get("captures", []):
            print("   ", json.dumps(c), flush=True)
    result = {
        "command": "python3 " + " ".join(shlex.quote(a) for a in sys.argv),
        "device": torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "model": args.model, "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "what": "ms per batch-16 decode step (CUDA graph replay / eager) and per batch-1 prefill, each with its "
                "host sync, before and after TorchProfilerCapture captures; slowdown_pct compares the last "
                "round with the first",
        "variants": variants,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
