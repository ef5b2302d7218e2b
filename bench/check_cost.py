"""Where one check's CPU goes: the sidecar in this process, fed Envoy's HTTP authorization requests.

In: a policy mode (``wasm`` in process, or ``server``: an OPA it starts), the whole gate or not
(``--gate``: API-key identity + ``bench/gateway_policies/kernelgate_gate.rego`` + Redis budgets on
a redis-server it starts; else ``policy_only.rego``), a workload (``distinct`` bodies or the
``realistic`` repeating few) and how many checks are in flight at once (``--concurrency``:
pipelined on one connection, as Envoy's HTTP client keeps a few connections busy).
Out (stdout, JSON): CPU µs per check of the whole sidecar process (``time.process_time``, no
profiler attached), then CPU µs per call of each step run alone over fresh inputs (transport,
input document, identity, policy document, cache key, policy evaluation, result, rate limit one
at a time and ``--concurrency`` at once, response, a whole check); ``--top N`` adds cProfile's
N functions with most own time. CPU per check is what noise on a shared machine disturbs
least: a loaded machine stretches wall time, not the instructions a check runs.

    python bench/check_cost.py --gate --checks 4000 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.processes import find_binary, free_port, start, wait_http, wait_tcp  # noqa: E402
from common.settings import build  # noqa: E402
from kernelgate.policy_bundle import build_wasm_bundle  # noqa: E402
from sidecar import http_contract, http_transport  # noqa: E402
from sidecar.config import OpaConfig, SidecarConfig  # noqa: E402
from sidecar.identity import hash_api_key  # noqa: E402

from bench.gateway import POLICIES, TENANTS, request_body  # noqa: E402  (the same policies, keys and bodies)

def requests(workload: str, gate: bool, count: int, first: int = 0) -> list[bytes]:
    """The authorization requests Envoy's http_service sends (bench/gateway.py's targets); distinct
    bodies are numbered from ``first``, so sets made with different ``first`` never repeat."""
    rng = random.Random(7 + first)
    keys = list(TENANTS)
    out = []
    for i in range(first, first + count):
        route, fields = request_body(i, workload, rng)
        body = json.dumps(fields).encode()
        headers = {"host": "127.0.0.1:10000", "user-agent": "Go-http-client/1.1", "content-type": "application/json",
                   "x-forwarded-proto": "http", "x-request-id": f"{rng.getrandbits(64):016x}-req",
                   "x-envoy-expected-rq-timeout-ms": "15000", "content-length": str(len(body)),
                   "x-kernelgate-authz-source": f"127.0.0.1:{40000 + i % 64}",
                   "x-kernelgate-authz-destination": "127.0.0.1:10000", "x-kernelgate-authz-scheme": "http",
                   "x-kernelgate-authz-protocol": "HTTP/1.1"}
        headers["x-api-key" if gate else "x-user"] = keys[i % len(keys)] if gate else f"user-{i % 3}"
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        out.append(f"POST {http_contract.PATH_PREFIX}{route} HTTP/1.1\r\n{head}\r\n".encode() + body)
    return out


class Sink(asyncio.Transport):
    """The connection back to Envoy: counts answers."""

    def __init__(self) -> None:
        super().__init__()
        self.answers = 0
        self.allowed = 0
        self.waiter: asyncio.Future | None = None
        self.want = 0

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.answers += 1
        self.allowed += data.startswith(b"HTTP/1.1 200")
        if self.waiter is not None and self.answers >= self.want and not self.waiter.done():
            self.waiter.set_result(None)

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


async def drive(protocol: asyncio.Protocol, sink: Sink, batch: list[list[bytes]]) -> None:
    """Each group's requests arrive together (pipelined); the next group once all are answered."""
    loop = asyncio.get_running_loop()
    for group in batch:
        sink.waiter, sink.want = loop.create_future(), sink.answers + len(group)
        protocol.data_received(b"".join(group))
        await sink.waiter


def sidecar_config(workdir: Path, args: argparse.Namespace, opa_url: str, redis_port: int | None) -> SidecarConfig:
    policy_dir = workdir / "policy"
    policy_dir.mkdir()
    shutil.copy(POLICIES / ("kernelgate_gate.rego" if args.gate else "policy_only.rego"), policy_dir / "policy.rego")
    opa: dict = {"url": opa_url} if args.mode == "server" else {
        "mode": "wasm", "wasm_bundle_file": str(build_wasm_bundle(policy_dir, workdir / "bundle.tar.gz",
                                                                  OpaConfig().policy_path))}
    authz: dict = {"listen": f"127.0.0.1:{free_port()}", "metrics_listen": "",
                   "http_listen": f"127.0.0.1:{free_port()}",
                   "opa": {**opa, "revision_paths": []}, "decision_log": {"enabled": False},
                   "replicas": {"targets": []}}
    if args.gate:
        keys = workdir / "api-keys.yaml"
        keys.write_text(yaml.safe_dump({hash_api_key(k): {"tenant": t, "tier": "pro", "scopes": ["*"], "name": t}
                                        for k, t in TENANTS.items()}))
        authz["identity"] = {"api_keys_file": str(keys)}
        # a loaded machine must not push checks onto the local fallback: that is not the path measured
        authz["ratelimit"] = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0",
                              "redis_timeout_s": 1.0}
    return build(SidecarConfig, authz, "authz")


async def measure(args: argparse.Namespace, config: SidecarConfig) -> dict:
    from sidecar import server

    sidecar = await server.start(config)
    try:
        check = sidecar.authorizer.check
        raw = requests(args.workload, args.gate, args.checks, first=1_000_000)

        def batches(reqs: list[bytes]) -> list[list[bytes]]:
            return [reqs[i:i + args.concurrency] for i in range(0, len(reqs), args.concurrency)]

        def connection() -> tuple[asyncio.Protocol, Sink]:
            proto = http_transport._Protocol(check, set(), asyncio.Event())
            sink = Sink()
            proto.connection_made(sink)
            return proto, sink

        proto, sink = connection()
        await drive(proto, sink, batches(requests(args.workload, args.gate, 500)))  # warm-up: connections, script
        proto, sink = connection()
        before, wall = os.times(), time.perf_counter()
        await drive(proto, sink, batches(raw))
        after, wall = os.times(), time.perf_counter() - wall
        assert sink.answers == len(raw), (sink.answers, len(raw))
        user, system = after.user - before.user, after.system - before.system
        result = {"checks": len(raw), "allowed": sink.allowed,
                  "cpu_us_per_check": round((user + system) / len(raw) * 1e6, 1),
                  "user_us_per_check": round(user / len(raw) * 1e6, 1),
                  "system_us_per_check": round(system / len(raw) * 1e6, 1),
                  "wall_us_per_check": round(wall / len(raw) * 1e6, 1)}
        result["us_per_check_by_step"] = await step_costs(
            sidecar, requests(args.workload, args.gate, args.checks, first=2_000_000), args.concurrency)
        if args.top:
            proto, sink = connection()
            profiler = cProfile.Profile()
            profiler.enable()
            await drive(proto, sink, batches(raw))
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
        return result
    finally:
        await server.stop(sidecar, 1.0)


async def step_costs(sidecar, raw: list[bytes], concurrency: int) -> dict[str, float]:
    """CPU µs per call of each step, each run alone over every input (``time.process_time``).

    Reaches into the sidecar's parts (a benchmark may): the same objects ``server.start`` built.
    """
    from sidecar import response
    from sidecar.decision import cache_key, parse_result
    from sidecar.input import build_input, policy_document

    authorizer = sidecar.authorizer
    decider = authorizer._decider
    n = len(raw)
    out: dict[str, float] = {}

    def timed(label: str, seconds: float, calls: int = n) -> None:
        out[label] = round(seconds / calls * 1e6, 1)

    captured: list = []
    fixed = response.allow({"x-kernelgate-tenant": "acme", "x-kernelgate-decision-id": "0" * 32}, ["x-api-key"],
                           {"ratelimit-remaining": "99"})

    async def noop(request, metadata):
        captured.append(request)
        return fixed

    proto = http_transport._Protocol(noop, set(), asyncio.Event())
    sink = Sink()
    proto.connection_made(sink)
    cpu = time.process_time()
    await drive(proto, sink, [raw[i:i + concurrency] for i in range(0, n, concurrency)])
    timed("transport alone (parse, CheckRequest, task, framing; no-op check)", time.process_time() - cpu)
    requests_ = captured[:n]

    cpu = time.process_time()
    inputs = [build_input(r, authorizer._limits) for r in requests_]
    timed("input document (build_input)", time.process_time() - cpu)
    cpu = time.process_time()
    identities = [await authorizer._authenticator.authenticate(ci.headers, ci.peer_principal, ci.peer_certificate)
                  for ci in inputs]
    timed("identity", time.process_time() - cpu)
    cpu = time.process_time()
    documents = [policy_document(ci, ident.to_input(), 100, []) for ci, ident in zip(inputs, identities)]
    timed("policy document", time.process_time() - cpu)
    cpu = time.process_time()
    for doc in documents:
        cache_key(doc, decider._ignore)
    timed("decision cache key", time.process_time() - cpu)
    cpu = time.process_time()
    results = [await decider._client.evaluate(doc) for doc in documents]
    timed("policy evaluation (no cache)", time.process_time() - cpu)
    cpu = time.process_time()
    decisions = [parse_result(r) for r in results]
    timed("policy result -> Decision", time.process_time() - cpu)
    if authorizer._rate_limiter is not None:
        cpu = time.process_time()
        for i, (ci, ident, dec) in enumerate(zip(inputs, identities, decisions)):
            await authorizer._rate_limit(ci, ident, dec, None, f"{i:032x}")
        timed("rate limit, one check at a time", time.process_time() - cpu)
        cpu = time.process_time()
        for i in range(0, n, concurrency):
            await asyncio.gather(*(authorizer._rate_limit(ci, ident, dec, None, f"{i + j:032x}")
                                   for j, (ci, ident, dec) in enumerate(zip(
                                       inputs[i:i + concurrency], identities[i:i + concurrency],
                                       decisions[i:i + concurrency]))))
        timed(f"rate limit, {concurrency} checks at once", time.process_time() - cpu)
    cpu = time.process_time()
    for _ in range(n):
        response.allow({"x-kernelgate-tenant": "acme", "x-kernelgate-decision-id": "0" * 32, "x-model": "gpt2"},
                       ["x-api-key"], {"ratelimit-remaining": "99", "ratelimit-limit": "100"})
    timed("response (CheckResponse)", time.process_time() - cpu)
    cpu = time.process_time()
    for r in requests_:
        await authorizer.check(r)
    timed("whole Authorizer.check, one at a time (the decisions above are cached)", time.process_time() - cpu)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["wasm", "server"], default="wasm")
    parser.add_argument("--gate", action="store_true", help="identity + gate policy + Redis budgets")
    parser.add_argument("--workload", choices=["distinct", "realistic"], default="distinct")
    parser.add_argument("--checks", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=1, help="checks in flight at once (pipelined)")
    parser.add_argument("--top", type=int, default=0, help="also print the N functions with most own time")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kernelgate-check-cost-"))
    procs = []
    try:
        opa_url = ""
        if args.mode == "server":
            port = free_port()
            policy = workdir / "opa-policy"
            policy.mkdir()
            shutil.copy(POLICIES / ("kernelgate_gate.rego" if args.gate else "policy_only.rego"), policy / "p.rego")
            procs.append(start("opa", [find_binary("opa"), "run", "--server", "--addr", f"127.0.0.1:{port}",
                                       "--log-level", "error", str(policy)], workdir / "logs"))
            wait_http(f"http://127.0.0.1:{port}/health", proc=procs[-1])
            opa_url = f"http://127.0.0.1:{port}"
        redis_port = None
        if args.gate:
            redis_port = free_port()
            procs.append(start("redis", [find_binary("redis-server"), "--port", str(redis_port), "--bind",
                                         "127.0.0.1", "--save", "", "--appendonly", "no"], workdir / "logs"))
            wait_tcp(redis_port, proc=procs[-1])
        config = sidecar_config(workdir, args, opa_url, redis_port)
        try:
            import uvloop
            result = uvloop.run(measure(args, config))
        except ImportError:  # pragma: no cover
            result = asyncio.run(measure(args, config))
        print(json.dumps({"mode": args.mode, "gate": args.gate, "workload": args.workload,
                          "concurrency": args.concurrency, **result}, indent=1))
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
