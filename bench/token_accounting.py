"""Token accounting, side by side: reserve + settle (ours) vs charge-the-estimate-at-admission, on
the memory and the Redis backend, through the real pod on loopback (Envoy -> sidecar + OPA ->
inference server on CPU, tiny random-weight model; demo byte-level tokenizer).

Two phases per (backend, mode), each on a fresh stack:
  mix:         N requests of a mixed workload for tenant acme (large budget): non-streamed with a
               stop sequence (short output, large max_tokens), streams with and without
               include_usage, client disconnects, long outputs (ignore_eos), 8 at a time.
  concurrency: 64 requests at once for tenant globex against a small budget (ignore_eos, so each
               uses exactly prompt + max_tokens).
Reported per run: tokens_charged (what the budget kept: settlements, or the admission charges of
the estimate path), tokens_used (the inference server's own prefill + generated token counters),
overcharge_pct, admitted_over_budget_tokens (tokens the admitted 64-way requests used beyond the
budget), p50/p99 of the check (decision log) and of client latency of non-streamed requests.
Three modes: estimate-only (the path before), reserve+settle with the prompt estimated, and
reserve+settle with the prompt counted by the inference server (what counting costs, apart).

  python bench/token_accounting.py --requests 120 --out bench/results/token_accounting.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
from collections import Counter
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import procs  # noqa: E402
from tests.stack import ACME_KEY, GLOBEX_KEY, AuthzStack  # noqa: E402

BIG = {"requests": 1_000_000, "tokens": 10_000_000, "unit": "day"}
SMALL_BUDGET = 2000


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def configure(stack: AuthzStack) -> None:
    data_file = stack.policy_dir / "data.json"
    data = json.loads(data_file.read_text())
    data["kernelgate"]["tiers"]["pro"]["limits"] = BIG
    data["kernelgate"]["tiers"]["free"]["limits"] = {"requests": 1_000_000, "tokens": SMALL_BUDGET, "unit": "day"}
    data_file.write_text(json.dumps(data))


async def server_tokens(stack: AuthzStack) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{stack.upstream_port}/metrics") as resp:
            text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in ("kernelgate_inference_prompt_tokens_total", "kernelgate_inference_generated_tokens_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def one(session: aiohttp.ClientSession, stack: AuthzStack, key: str, body: dict[str, Any],
              hang_up_after: int | None = None) -> tuple[int, float]:
    headers = {"x-api-key": key, "content-type": "application/json"}
    started = time.perf_counter()
    async with session.post(stack.url + "/v1/completions", json=body, headers=headers) as resp:
        if body.get("stream"):
            seen = 0
            async for _ in resp.content.iter_any():
                seen += 1
                if hang_up_after is not None and seen >= hang_up_after:
                    resp.close()
                    break
        else:
            await resp.read()
        return resp.status, time.perf_counter() - started


async def probe(stack: AuthzStack) -> str:
    """Greedy text of a probe gives a stop sequence that ends the long-allowance requests early."""
    async with aiohttp.ClientSession() as session:
        async with session.post(stack.url + "/v1/completions", headers={"x-api-key": ACME_KEY}, json={
                "model": "tiny-gpt2", "prompt": "The pod", "max_tokens": 24, "temperature": 0}) as resp:
            text = (await resp.json())["choices"][0]["text"]
    return next((text[i:i + 2] for i in range(6, len(text) - 2)
                 if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2]), text[-2:])


async def mix(stack: AuthzStack, n: int, seed: int, stop: str) -> list[float]:
    rng = random.Random(seed)
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        semaphore = asyncio.Semaphore(8)

        async def request(i: int) -> None:
            kind = rng.random()
            base = {"model": "tiny-gpt2", "prompt": f"The pod {i % 7}" if kind < 0.4 else f"request {i}: budgets",
                    "temperature": 0}
            async with semaphore:
                if kind < 0.4:
                    status, latency = await one(session, stack, ACME_KEY,
                                                {**base, "prompt": "The pod", "max_tokens": 256, "stop": [stop]})
                    latencies.append(latency)
                elif kind < 0.6:
                    await one(session, stack, ACME_KEY, {**base, "max_tokens": 128, "stream": True,
                                                         "stream_options": {"include_usage": True}})
                elif kind < 0.8:
                    await one(session, stack, ACME_KEY, {**base, "max_tokens": 128, "stream": True})
                elif kind < 0.9:
                    await one(session, stack, ACME_KEY, {**base, "max_tokens": 400, "ignore_eos": True,
                                                         "stream": True}, hang_up_after=3)
                else:
                    status, latency = await one(session, stack, ACME_KEY,
                                                {**base, "max_tokens": 64, "ignore_eos": True})
                    latencies.append(latency)

        await asyncio.gather(*(request(i) for i in range(n)))
    return latencies


async def burst(stack: AuthzStack) -> int:
    body = {"model": "tiny-gpt2", "prompt": "sixty-four requests at once", "max_tokens": 100, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(one(session, stack, GLOBEX_KEY, body) for _ in range(64)))
    return sum(1 for status, _ in results if status == 200)


def charged(stack: AuthzStack, settle: bool, tenant: str) -> int:
    if settle:
        return sum(s["charged"] for s in stack.settlements() if s["tenant"] == tenant)
    return sum(d["rate_limit"].get("charged", 0) for d in stack.decisions()
               if d["tenant"] == tenant and d["outcome"] == "allow")


async def settled(stack: AuthzStack, settle: bool, timeout: float = 60.0) -> None:
    """Wait until every allowed generation request has its settlement (ours) or a moment (estimate)."""
    if not settle:
        await asyncio.sleep(1.0)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        allowed = {d["decision_id"] for d in stack.decisions() if d["outcome"] == "allow"}
        if allowed <= {s["decision_id"] for s in stack.settlements()}:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("settlements did not all arrive")


MODES = {
    # the path as it was before: prompt at chars_per_token + max_tokens, charged at admission, never settled
    "estimate-only": {"settle": False, "count_url": ""},
    # reserve and settle, the prompt estimated (what settlement alone costs at admission)
    "reserve+settle, estimated prompt": {"settle": True, "count_url": ""},
    # reserve and settle, the prompt counted by the server's /tokenize (the default with a counter)
    "reserve+settle": {"settle": True},
}


async def run_one(workdir: Path, backend: str, mode: str, n: int, redis_url: str | None) -> dict[str, Any]:
    settle = MODES[mode]["settle"]
    # a Redis reply slowed by the load must not send requests to the local fallback budget
    authz: dict[str, Any] = {"ratelimit": {**MODES[mode], "redis_timeout_s": 10.0, "redis_failure_mode": "deny"}}
    results: dict[str, Any] = {"backend": backend, "mode": mode}
    for phase in ("mix", "concurrency"):
        stack = AuthzStack(workdir / f"{backend}-{list(MODES).index(mode)}-{phase}", redis_url=redis_url,
                           inference=True,
                           authz_overrides=authz,
                           # the estimate-only path had no reports either
                           inference_overrides={} if settle else {"usage_report": {"address": ""}})
        stack.workdir.mkdir(parents=True, exist_ok=True)
        configure(stack)
        if redis_url:
            import redis

            redis.Redis.from_url(redis_url).flushall()
        stack.start()
        try:
            tenant = "acme" if phase == "mix" else "globex"
            stop = await probe(stack) if phase == "mix" else ""
            await settled(stack, settle)
            before, kept_before = await server_tokens(stack), charged(stack, settle, tenant)
            if phase == "mix":
                latencies = await mix(stack, n, 7, stop)
            else:
                admitted = await burst(stack)
            await settled(stack, settle)
            used = await server_tokens(stack) - before
            kept = charged(stack, settle, tenant) - kept_before
            if phase == "mix":
                checks = [d["latency_ms"] for d in stack.decisions() if d["tenant"] == tenant]
                results[phase] = {
                    "requests": n, "tokens_charged": kept, "tokens_used": int(used),
                    "overcharge_pct": round(100.0 * (kept - used) / used, 2) if used else 0.0,
                    "check_ms_p50": round(percentile(checks, 50), 3), "check_ms_p99": round(percentile(checks, 99), 3),
                    "request_ms_p50": round(1000 * percentile(latencies, 50), 2),
                    "request_ms_p99": round(1000 * percentile(latencies, 99), 2),
                    "decisions": dict(Counter(f"{d['outcome']}:{d['reason']}" for d in stack.decisions())),
                    "settlements": len(stack.settlements()),
                    "expired": sum(1 for s in stack.settlements() if s["outcome"] == "expired"),
                }
            else:
                results[phase] = {
                    "requests": 64, "budget": SMALL_BUDGET, "admitted": admitted, "tokens_charged": kept,
                    "tokens_used": int(used), "admitted_over_budget_tokens": max(0, int(used) - SMALL_BUDGET),
                    "overcharge_pct": round(100.0 * (kept - used) / used, 2) if used else 0.0,
                }
        finally:
            stack.stop()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=120, help="requests in the mixed phase")
    parser.add_argument("--backends", default="memory,redis")
    parser.add_argument("--out", default="bench/results/token_accounting.json")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="kg-tokens-") as tmp:
        workdir = Path(tmp)
        redis_proc = procs.start_redis(workdir / "redis") if "redis" in args.backends else None
        redis_url = f"redis://127.0.0.1:{redis_proc.ports['port']}/0" if redis_proc else None
        try:
            for backend in args.backends.split(","):
                for mode in MODES:  # side by side, same machine, same workload
                    run = await run_one(workdir, backend, mode, args.requests,
                                        redis_url if backend == "redis" else None)
                    print(json.dumps(run), flush=True)
                    runs.append(run)
        finally:
            if redis_proc:
                redis_proc.stop()
    out = {
        "command": f"python bench/token_accounting.py --requests {args.requests} --backends {args.backends} "
                   f"--out {args.out}",
        "device": f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
                  "tiny-gpt2 random weights, demo byte-level tokenizer",
        "note": "latency numbers come from a machine shared with other jobs (loaded): compare the modes side by "
                "side within this file, not with other files",
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
