"""What would kernel capture cost through CUPTI's Activity API directly, without Kineto? (issue #4 diagnostic)

torch's profiler costs the engine thread ~34 ms per captured pass on the H100 (about 19 ms to
start, CUPTI re-attaching, and 15 ms to stop, Kineto processing the records with the GIL held),
and preparing it on another thread made it far worse (bench/results/tracing_gpu_prepare_ahead.json).
This script measures the same passes captured with NVIDIA's ``cupti-python`` bindings: enable the
kernel activity kinds, run one pass, disable them; the records are flushed and turned into
Python objects separately (in the server that would be the worker thread). Variants, each in a
fresh child process:

* ``control``: no capture; the drift of the timings over the run;
* ``activity``: enable/disable around each captured pass, CUPTI stays attached;
* ``finalize``: as ``activity``, then ``cupti.finalize()`` after each flush (detach, as
  Kineto's ``TEARDOWN_CUPTI`` does), so the next capture attaches again;
* ``reregister``: as ``finalize``, registering the buffer callbacks again before each capture
  (after a finalize CUPTI forgets them, and a capture without them records nothing).

For each: what enable, disable, flush and finalize cost, how many kernel records a prefill and
a graph-replayed decode step gave and whether they fall inside the pass's wall-clock window
(mapped through ``cupti.get_timestamp()`` read next to ``time.time_ns()``), and graph decode and
eager prefill times before and after the captures (a lingering slowdown would show there).

    python3 bench/cupti_direct.py --out bench/results/cupti_direct.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("control", "activity", "finalize", "reregister")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-medium")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--captures", type=int, default=6)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--out", default=str(ROOT / "bench/results/cupti_direct.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


class Records:
    """CUPTI's buffer callbacks: hands out buffers, keeps the kernel records it gets back."""

    def __init__(self) -> None:
        self.kernels: list[tuple[str, int, int]] = []
        self.other = 0

    def requested(self) -> tuple[int, int]:
        return 8 << 20, 0

    def completed(self, activities: list) -> None:
        from cupti import cupti

        for a in activities:
            if a.kind in (cupti.ActivityKind.CONCURRENT_KERNEL, cupti.ActivityKind.KERNEL):
                self.kernels.append((a.name, a.start, a.end))
            else:
                self.other += 1


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from cupti import cupti

    from bench.pass_timing import PassTimer

    out: dict[str, Any] = {"variant": args.child}
    with torch.inference_mode():
        timer = PassTimer.build(args.model, "cuda", args.batch, args.prompt_tokens)
        out["graphs"] = timer.graphs
        graph_step, prefill, bench = timer.graph_step, timer.prefill, timer.bench
        rounds = [{"after": "nothing", **bench()}, {"after": "nothing (again)", **bench()}]
        captures = []
        if args.child != "control":
            records = Records()
            t0 = time.perf_counter_ns()
            cupti.activity_register_callbacks(records.requested, records.completed)
            out["register_ms"] = round((time.perf_counter_ns() - t0) / 1e6, 2)
            kinds = (cupti.ActivityKind.CONCURRENT_KERNEL,)
            for i in range(args.captures):
                which = "prefill" if i % 2 == 0 else "graph_decode"
                records.kernels.clear()
                register_ms = None
                if args.child == "reregister" and i > 0:
                    t0 = time.perf_counter_ns()
                    cupti.activity_register_callbacks(records.requested, records.completed)
                    register_ms = round((time.perf_counter_ns() - t0) / 1e6, 2)
                t0 = time.perf_counter_ns()
                for kind in kinds:
                    cupti.activity_enable(kind)
                t1 = time.perf_counter_ns()
                readings = []
                for _ in range(3):
                    before = time.time_ns()
                    stamp = cupti.get_timestamp()
                    readings.append((time.time_ns() - before, stamp, before))
                wall_lo = time.time_ns()
                (prefill if which == "prefill" else graph_step)()
                wall_hi = time.time_ns()
                t2 = time.perf_counter_ns()
                for kind in kinds:
                    cupti.activity_disable(kind)
                t3 = time.perf_counter_ns()
                cupti.activity_flush_all(1)
                t4 = time.perf_counter_ns()
                finalize_ms = None
                if args.child in ("finalize", "reregister"):
                    cupti.finalize()
                    finalize_ms = round((time.perf_counter_ns() - t4) / 1e6, 2)
                gap, stamp, before = min(readings)
                offset = before + gap // 2 - stamp  # wall = cupti + offset
                inside = sum(1 for _, s, e in records.kernels if wall_lo <= s + offset <= e + offset <= wall_hi)
                captures.append({"pass": which, "register_ms": register_ms, "enable_ms": round((t1 - t0) / 1e6, 3),
                                 "forward_ms": round((t2 - t1) / 1e6, 2), "disable_ms": round((t3 - t2) / 1e6, 3),
                                 "flush_and_records_ms": round((t4 - t3) / 1e6, 2), "finalize_ms": finalize_ms,
                                 "kernels": len(records.kernels), "other_records": records.other,
                                 "kernels_inside_window": inside, "anchor_gap_us": round(gap / 1e3, 2),
                                 "first_kernels": sorted({n[:60] for n, _, _ in records.kernels[:3]})})
                records.other = 0
                rounds.append({"after": f"capture {i + 1} ({which})", **bench()})
        out["captures"] = captures
        out["rounds"] = rounds
        first, last = rounds[0], rounds[-1]
        out["slowdown_pct_after_captures"] = {k: round(100 * (last[k] - first[k]) / first[k], 1)
                                              for k in ("graph_decode_ms", "eager_prefill_ms")}
    return out


def main() -> int:
    args = parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    import torch

    results: dict[str, Any] = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--child", variant, "--model", args.model, "--batch", str(args.batch),
               "--prompt-tokens", str(args.prompt_tokens), "--captures", str(args.captures)]
        began = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            results[variant] = json.loads(found[-1]) if found else {"rc": proc.returncode,
                                                                     "stderr": proc.stderr[-3000:]}
        except subprocess.TimeoutExpired as exc:
            results[variant] = {"timeout": args.timeout, "stderr": (exc.stderr or b"")[-3000:].decode(errors="replace")}
        results[variant]["wall_s"] = round(time.monotonic() - began, 1)
        print(variant, json.dumps(results[variant])[:3000], flush=True)
    import importlib.metadata as md

    result = {"command": "python3 " + " ".join(shlex.quote(a) for a in sys.argv),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cupti_python": md.version("cupti-python"), "model": args.model, "batch": args.batch,
              "prompt_tokens": args.prompt_tokens, "variants": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
