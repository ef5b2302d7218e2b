"""Where the full gate's CPU goes under load, process by process, and inside the sidecar.

In: one kernelgate gate system as ``bench/gateway.py`` starts it (``kg_gate_http_wasm`` by
default: Envoy with one worker + the sidecar doing API-key identity, the gate policy in Wasm and
Redis budgets + its redis-server), the distinct workload, vegeta in closed loop (``--concurrency``
workers) for ``--seconds``. Out (stdout, JSON): requests, req/s, CPU µs per request of each process
(Envoy, the sidecar, Redis, and vegeta itself); with ``--py-spy FILE`` (py-spy on PATH) the sidecar
is sampled during the window and the top functions by own time are printed as µs per check
(samples x interval / requests: the sidecar's share of the check, by function, subprocesses
such as py-spy's own not counted); ``--perf FILE``: ``perf record`` of the sidecar (native: the
interpreter, the C extensions, the kernel), summarized by shared object.

Per-thread CPU comes from /proc, which the kernel charges in scheduler ticks: a thread woken by a
timer (the Wasm epoch ticker) is often running when the tick lands and is overcharged; the
process total is what to compare. py-spy (``pip install py-spy``, not a dependency of the project)
is a sampling profiler: attach it to compare where the time goes, not to add up to the CPU.

CPU per request through Envoy is what ``bench/gateway.py``'s ``cpu_ms_per_check`` adds up
(minus Envoy alone), here split by process: the lever on 2 cores is the sum.

    python bench/gate_profile.py --seconds 10
    python bench/gate_profile.py --seconds 10 --py-spy /tmp/gate.spy.txt
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.processes import find_binary  # noqa: E402

from bench.gateway import cpu_seconds, start_system, start_upstream, write_key_files, write_targets  # noqa: E402


def threads_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid``, by thread name (the main thread: "main"; others by name
    and id, as Python's threads share the process's name)."""
    out: dict[str, float] = collections.Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = "main" if task.name == str(pid) else f"{(task / 'comm').read_text().strip()}-{task.name}"
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def thread_names(pid: int) -> dict[str, str]:
    """threads_cpu's keys -> Python's thread names, as ``py-spy dump`` reads them (if on PATH)."""
    spy = shutil.which("py-spy")
    if spy is None:
        return {}
    out = subprocess.run([spy, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True).stdout
    names = {}
    for line in out.splitlines():
        if line.startswith("Thread "):
            tid, _, rest = line[len("Thread "):].partition(" ")
            name = rest.split('"')[1] if '"' in rest else rest
            names[f"python-{tid}"] = f"{name}-{tid}"
    return names


def summarize_py_spy(path: Path, requests: int, rate_hz: int, top: int) -> list[dict]:
    """py-spy's ``raw`` output (folded stacks, one line per stack with its count) -> own time per
    function and inclusive time of a few named steps, as µs per request."""
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    per = 1e6 / rate_hz / max(requests, 1)
    rows = [{"function": f, "own_us": round(n * per, 1)} for f, n in own.most_common(top)]
    rows.append({"function": "(all samples)", "own_us": round(total * per, 1)})
    steps = [{"function": f, "inclusive_us": round(n * per, 1)} for f, n in inclusive.most_common(top)]
    return rows + [{"inclusive": steps}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", default="kg_gate_http_wasm")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rate", type=int, default=0, help="open loop at this rate instead of closed loop")
    parser.add_argument("--py-spy", type=Path, default=None, help="sample the sidecar with py-spy into this file")
    parser.add_argument("--py-spy-rate", type=int, default=500)
    parser.add_argument("--perf", type=Path, default=None, help="perf record the sidecar into this file")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kernelgate-gate-profile-"))
    upstream, upstream_port = start_upstream(workdir)
    write_key_files(workdir)
    system = start_system(args.system, workdir, upstream_port)
    try:
        targets = workdir / "targets"
        write_targets(targets, system.url, "distinct", gate="gate" in args.system or args.system == "anchor",
                      count=200000)
        vegeta = find_binary("vegeta")
        warm = subprocess.run([vegeta, "attack", "-format=json", f"-targets={targets}", "-duration=2s", "-rate=300/s"],
                              capture_output=True, check=True)
        del warm
        procs = {p.name: p.popen.pid for p in system.procs}
        before = {p.name: cpu_seconds([p]) for p in system.procs}  # each process and its children
        sidecar = next(pid for name, pid in procs.items() if name == args.system)
        threads_before = threads_cpu(sidecar)
        load = ["-rate=0", f"-workers={args.concurrency}", f"-max-workers={args.concurrency}"] if not args.rate \
            else [f"-rate={args.rate}/s", "-workers=16", "-max-workers=512"]
        samplers = []
        if args.py_spy:
            samplers.append(subprocess.Popen(
                [shutil.which("py-spy") or "py-spy", "record", "--pid", str(sidecar), "--rate", str(args.py_spy_rate),
                 "--duration", str(int(args.seconds)), "--format", "raw", "--output", str(args.py_spy),
                 "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if args.perf:
            samplers.append(subprocess.Popen(
                ["perf", "record", "-F", "999", "-g", "-p", str(sidecar), "-o", str(args.perf), "--",
                 "sleep", str(args.seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wall = time.perf_counter()
        attack = subprocess.Popen([vegeta, "attack", "-format=json", f"-targets={targets}",
                                   f"-duration={args.seconds}s", "-timeout=5s", "-keepalive=true", *load],
                                  stdout=subprocess.PIPE)
        out, _ = attack.communicate()
        wall = time.perf_counter() - wall
        after = {p.name: cpu_seconds([p]) for p in system.procs}
        threads_after = threads_cpu(sidecar)
        names = thread_names(sidecar)
        for sampler in samplers:
            sampler.wait(timeout=60)
        report = json.loads(subprocess.run([vegeta, "report", "-type=json"], input=out, capture_output=True,
                                           check=True).stdout)
        requests = report["requests"]
        result = {"system": args.system, "mode": "open" if args.rate else "closed",
                  "concurrency": args.concurrency, "rate": args.rate, "seconds": round(wall, 2),
                  "requests": requests, "throughput_rps": round(report["throughput"], 1),
                  "p99_ms": report["latencies"]["99th"] / 1e6, "status_codes": report["status_codes"],
                  "cpu_us_per_request": {name: round((after[name] - before[name]) / max(requests, 1) * 1e6, 1)
                                         for name in procs},
                  "sidecar_threads_cpu_us_per_request": {
                      names.get(name, name): round((threads_after[name] - threads_before.get(name, 0.0))
                                                   / max(requests, 1) * 1e6, 1)
                      for name in threads_after if threads_after[name] > threads_before.get(name, 0.0)},
                  "loadavg": os.getloadavg()}
        result["cpu_us_per_request"]["total"] = round(sum(result["cpu_us_per_request"].values()), 1)
        if args.py_spy and args.py_spy.exists():
            result["sidecar_py_spy"] = summarize_py_spy(args.py_spy, requests, args.py_spy_rate, args.top)
        print(json.dumps(result, indent=1))
    finally:
        system.stop()
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
