"""The GIL convoy a loading thread inflicts on a stepping thread, by switch interval (CPU, #15 hot swap).

A "serving" thread runs steps of ``--ops`` small torch ops (each gives the GIL up and takes it
back) with a 0.5 ms sleep between steps, for one second per setting; a "loading" thread runs pure
Python in 5 ms chunks, without pauses or pausing as long as each chunk took (``duty``). Per switch
interval and duty: the serving thread's steps in that second and their median and p99 (ms). Alone,
the serving thread shows the machine's floor. On a shared machine the numbers are noisy; the step
counts separate the settings more clearly than the percentiles.

    python bench/gil_convoy.py --out /tmp/gil_convoy.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_report  # noqa: E402


def run(interval: float, duty: bool, busy: bool, ops: int) -> dict:
    import torch

    torch.set_num_threads(1)
    x = torch.zeros(16)
    sys.setswitchinterval(interval)
    stop = threading.Event()

    def loader() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            while time.perf_counter() - started < 0.005:
                sum(i * i for i in range(200))
            if duty:
                time.sleep(time.perf_counter() - started)

    thread = threading.Thread(target=loader)
    if busy:
        thread.start()
    steps: list[float] = []
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        started = time.perf_counter()
        for _ in range(ops):
            x.add_(1)
        steps.append(1e3 * (time.perf_counter() - started))
        time.sleep(0.0005)
    stop.set()
    if busy:
        thread.join()
    steps.sort()
    sys.setswitchinterval(0.005)
    return {"steps_per_s": len(steps), "median_ms": round(statistics.median(steps), 3),
            "p99_ms": round(steps[int(0.99 * len(steps))], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=60)
    parser.add_argument("--switch-intervals", type=float, nargs="+", default=[0.005, 0.0005, 0.0001, 0.00005, 0.00002])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {"alone": run(0.005, False, False, args.ops)}
    for interval in args.switch_intervals:
        for duty in (False, True):
            results[f"{interval * 1e6:g}us{'_duty' if duty else ''}"] = run(interval, duty, True, args.ops)
    write_report("gil_convoy", args.out, {"ops": args.ops, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
