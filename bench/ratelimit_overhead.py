"""Latency of one rate limit charge (two budgets: requests and tokens), memory vs Redis.

Starts its own redis-server on a free loopback port. Charges are awaited one after another,
so the numbers are per-request overhead, not throughput. Writes bench/results/ratelimit.json.

    python bench/ratelimit_overhead.py [--charges 20000] [--tenants 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.ratelimit import Budget, MemoryRateLimiter, RateLimiter, RedisRateLimiter  # noqa: E402
from tests import procs  # noqa: E402


def budgets(i: int, tenants: int) -> list[Budget]:
    key = f"tenant=t{i % tenants}|model=llama|route=/v1/completions"
    return [Budget(f"{key}|requests", 1_000_000, 60.0, 1, "requests"),
            Budget(f"{key}|tokens", 100_000_000, 60.0, 300, "tokens")]


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def measure(limiter: RateLimiter, charges: int, tenants: int, warmup: int = 1000) -> dict[str, float]:
    for i in range(warmup):
        await limiter.charge(budgets(i, tenants))
    samples = []
    denied = 0
    for i in range(charges):
        b = budgets(i, tenants)
        start = time.perf_counter_ns()
        result = await limiter.charge(b)
        samples.append((time.perf_counter_ns() - start) / 1000)
        denied += not result.allowed
    samples.sort()
    return {
        "p50_us": round(percentile(samples, 0.50), 1),
        "p99_us": round(percentile(samples, 0.99), 1),
        "p999_us": round(percentile(samples, 0.999), 1),
        "max_us": round(samples[-1], 1),
        "mean_us": round(statistics.fmean(samples), 1),
        "denied": denied,
    }


async def run(charges: int, tenants: int, redis_url: str) -> dict[str, dict[str, float]]:
    memory = MemoryRateLimiter()
    redis_limiter = RedisRateLimiter(redis_url, timeout_s=1.0, key_prefix="bench:")
    try:
        return {"memory": await measure(memory, charges, tenants),
                "redis": await measure(redis_limiter, charges, tenants)}
    finally:
        await redis_limiter.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--charges", type=int, default=20_000)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--out", default=str(ROOT / "bench/results/ratelimit.json"))
    args = parser.parse_args()
    try:
        import uvloop
        loop_name, runner = "uvloop", uvloop.run
    except ImportError:
        loop_name, runner = "asyncio", asyncio.run
    with tempfile.TemporaryDirectory() as tmp:
        redis = procs.start_redis(Path(tmp))
        try:
            url = f"redis://127.0.0.1:{redis.ports['port']}/0"
            results = runner(run(args.charges, args.tenants, url))
        finally:
            redis.stop()
    redis_version = subprocess.run([procs.find_binary("redis-server"), "--version"],
                                   capture_output=True, text=True).stdout.strip()
    report = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "what": "latency of one awaited charge() of 2 budgets (requests + tokens), sequential",
        "charges": args.charges,
        "tenants": args.tenants,
        "event_loop": loop_name,
        "python": platform.python_version(),
        "redis_server": redis_version,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "system": platform.system()},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["results"], indent=2))


if __name__ == "__main__":
    main()
