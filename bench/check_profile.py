"""CPU cost of one Check in process: the same CheckRequest bytes through the same pieces, on any tree.

What ``bench/gateway.py`` measures through Envoy and vegeta (CPU seconds per 1000 checks), without
the network, the other processes or the machine's load: the sidecar is built by the tree's own
``sidecar.server.start`` from the same config gateway.py gives it (API-key identity, the shipped
policy with budgets no request reaches, in-process Wasm or an OPA server, the memory limiter, no
decision log, telemetry as configured by default), and a list of serialized CheckRequests (like
vegeta's targets: three tenants' keys, a numbered completion body) goes through
``AuthorizationService.Check`` (parse the bytes, ask the authorizer) inside one event loop.
The measure is the process's CPU time (``time.process_time``, every thread) per check, best of
``--repeats`` batches: other processes on the machine slow a batch's wall time, not its CPU time.
They still slow its CPU time a little (shared caches, clock speed), so each batch is preceded by a
fixed pure-Python workload and ``per_unit`` reports check time / that workload's time: compare
trees on it when the machine is busy.

Scenarios: ``repeated`` sends one request over and over (decision-cache hits), ``distinct`` sends a
new body each time (the policy is evaluated for every check, as it is for gateway.py's first
1000 requests). ``--steps`` also times the steps of a repeated check (input, identity, decision,
rate-limit step and its limiter call, response, record), each wrapped in a CPU-time probe (the
probes cost the same on every tree). ``--profile FILE`` writes cProfile stats of one more batch;
``--compare A B`` prints the per-function difference of two such files (own time per check,
largest first; give the ``--iterations`` both were made with).

It imports only what both 2b0e0a4 (before the #17 restructure) and later trees have, so it runs
unchanged on either:

    PYTHONPATH=$T python bench/check_profile.py --tree $T --json /tmp/cp-$(basename $T).json \\
        --profile /tmp/cp-$(basename $T).prof
    python bench/check_profile.py --compare /tmp/cp-before.repeated.prof /tmp/cp-after.repeated.prof
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import platform
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def check_requests(count: int, distinct: bool, keys: list[str]) -> list[bytes]:
    """Serialized CheckRequests as Envoy sends them for gateway.py's targets (one repeated, or ``count``
    different bodies)."""
    from envoy.service.auth.v3 import external_auth_pb2

    out = []
    for i in range(count if distinct else 1):
        body = json.dumps({"model": "tiny-gpt2", "prompt": f"benchmark prompt number {i}", "max_tokens": 16})
        req = external_auth_pb2.CheckRequest()
        attrs = req.attributes
        attrs.source.address.socket_address.address = "127.0.0.1"
        attrs.source.address.socket_address.port_value = 40000 + i % 20000
        attrs.destination.address.socket_address.address = "127.0.0.1"
        attrs.destination.address.socket_address.port_value = 10000
        http = attrs.request.http
        http.id = str(1000000 + i)
        http.method, http.path, http.host, http.scheme, http.protocol = (
            "POST", "/v1/completions", "127.0.0.1:10000", "http", "HTTP/1.1")
        http.size = len(body)
        http.body = body
        for k, v in {":authority": "127.0.0.1:10000", ":path": "/v1/completions", ":method": "POST",
                     ":scheme": "http", "content-type": "application/json", "content-length": str(len(body)),
                     "user-agent": "Go-http-client/1.1", "accept-encoding": "gzip",
                     "x-api-key": keys[i % len(keys)], "x-vegeta-seq": str(i), "x-forwarded-proto": "http",
                     "x-request-id": f"{i:08x}-0000-4000-8000-000000000000"}.items():
            http.headers[k] = v
        out.append(req.SerializeToString())
    return out


def bench_policies(workdir: Path, tree: Path) -> Path:
    """``tree``'s shipped policy and data, with budgets high enough that no request is rate limited."""
    target = workdir / "policies"
    shutil.copytree(tree / "policies", target, ignore=shutil.ignore_patterns("*_test.rego"), dirs_exist_ok=True)
    data = json.loads((target / "data.json").read_text())
    for tier in data["kernelgate"]["tiers"].values():
        tier["limits"] = {"requests": 10**9, "tokens": 10**12, "unit": "minute"}
    for tenant in data["kernelgate"]["tenants"].values():
        tenant.pop("limits", None)
    (target / "data.json").write_text(json.dumps(data))
    return target


def write_config(workdir: Path, mode: str, tree: Path, decision_log: bool = False) -> tuple[Path, list]:
    """gateway.py's sidecar config (and its OPA server when ``mode`` is "server"); ``decision_log``:
    the log on (the default of a deployment), written to /dev/null, where gateway.py turns it off."""
    # after PYTHONPATH: the measured tree's modules win; this checkout's bench helpers stay reachable
    sys.path.append(str(ROOT))
    from kernelgate.policy_bundle import build_wasm_bundle
    from sidecar.config import OpaConfig
    from tests.stack import write_api_keys

    policies = bench_policies(workdir, tree)
    procs = []
    if mode == "wasm":
        opa = {"mode": "wasm", "wasm_bundle_file": str(build_wasm_bundle(policies, workdir / "bundle.tar.gz",
                                                                         OpaConfig().policy_path))}
    else:
        from bench import gateway

        port = gateway.free_port()
        proc = gateway.start("opa", [gateway.find_binary("opa"), "run", "--server", "--addr", f"127.0.0.1:{port}",
                                     "--log-level", "error", str(policies)], workdir / "logs")
        gateway.wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        procs.append(proc)
        opa = {"url": f"http://127.0.0.1:{port}"}
    keys = workdir / "api-keys.yaml"
    write_api_keys(keys)
    config = {"authz": {
        "listen": "127.0.0.1:0", "metrics_listen": "",
        "opa": {**opa, "cache_ignore_headers": [*OpaConfig().cache_ignore_headers, "x-vegeta-seq"]},
        "identity": {"api_keys_file": str(keys)},
        "decision_log": {"enabled": True, "output_file": "/dev/null"} if decision_log else {"enabled": False},
    }}
    path = workdir / "kernelgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, procs


def _unit() -> float:
    """CPU seconds of a fixed pure-Python workload (dicts, strings, JSON), the yardstick of a batch."""
    cpu = time.process_time()
    for i in range(3000):
        json.dumps({"model": "m", "prompt": f"p{i}", "n": [i, i + 1], "h": {"a": str(i)}})
    return time.process_time() - cpu


class _Context:
    """What AuthorizationService.Check reads of a grpc.aio context."""

    def invocation_metadata(self):
        return (("user-agent", "grpc-c++/1.66.0 grpc-c/43.0.0 (linux; chttp2)"),)


def _probe(owner, name: str, label: str, spent: dict[str, float]) -> None:
    """Replace ``owner.name`` by a wrapper adding its CPU time to ``spent[label]``."""
    import inspect

    call, clock = getattr(owner, name), time.process_time
    if inspect.iscoroutinefunction(call):
        async def probe(*args, **kwargs):
            started = clock()
            try:
                return await call(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + clock() - started
    else:
        def probe(*args, **kwargs):
            started = clock()
            try:
                return call(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + clock() - started
    setattr(owner, name, probe)


async def _steps(service, authorizer, raw: bytes, parse, context, iterations: int, repeats: int) -> dict:
    """CPU time per check of each step (names both trees share), best batch by total."""
    import sidecar.authorizer as authorizer_module

    spent: dict[str, float] = {}
    limiter = authorizer._rate_limiter
    reserves = bool(getattr(authorizer, "_reserve", False))
    for owner, name, label in ((authorizer_module, "build_input", "input"),
                               (authorizer._authenticator, "authenticate", "identity"),
                               (authorizer._decider, "decide", "decision"),
                               (authorizer, "_rate_limit", "rate_limit_step"),
                               (limiter, "reserve" if reserves else "charge", "rate_limit_step.limiter"),
                               (authorizer_module.response, "allow", "response"),
                               (authorizer, "_record", "record")):
        _probe(owner, name, label, spent)
    best: dict[str, float] | None = None
    for _ in range(repeats):
        spent.clear()
        cpu = time.process_time()
        for _ in range(iterations):
            await service.Check(parse(raw), context)
        total = time.process_time() - cpu
        if best is None or total < best["check"]:
            best = {"check": total, **spent}
    assert best is not None
    return {label: round(value / iterations * 1e6, 2) for label, value in best.items()}


async def measure(config_path: Path, iterations: int, repeats: int, profile: Path | None,
                  steps: bool = False, scenarios: tuple[str, ...] = ("repeated", "distinct")) -> dict:
    from envoy.service.auth.v3 import external_auth_pb2

    from kernelgate.config import load
    from otel.setup import configure_tracing
    from sidecar import server
    from tests.stack import ACME_KEY, GLOBEX_KEY

    config = load(config_path)
    results: dict = {}
    with configure_tracing(config.telemetry, "kernelgate-authz"):
        sidecar = await server.start(config.authz)
        try:
            service = server.AuthorizationService(sidecar.authorizer)
            context = _Context()
            parse = external_auth_pb2.CheckRequest.FromString
            for scenario in scenarios:
                distinct = scenario == "distinct"
                requests = check_requests(1 + iterations * (repeats + 1), distinct, [ACME_KEY, GLOBEX_KEY])
                first = await service.Check(parse(requests[0]), context)  # warm: caches, lazy imports
                assert first.status.code == 0, f"the benchmark's check is not allowed: {first}"
                batches = [requests[1 + b * iterations:1 + (b + 1) * iterations] if distinct
                           else requests * iterations for b in range(repeats + 1)]
                per_check, per_unit = [], []
                for batch in batches[:repeats]:
                    gc.collect()
                    unit = _unit()
                    cpu = time.process_time()
                    for raw in batch:
                        await service.Check(parse(raw), context)
                    per_check.append((time.process_time() - cpu) / len(batch))
                    per_unit.append(per_check[-1] / unit)
                results[scenario] = {"us_per_check_best": round(min(per_check) * 1e6, 2),
                                     "us_per_check_median": round(sorted(per_check)[len(per_check) // 2] * 1e6, 2),
                                     "per_unit_best": round(min(per_unit) * 1000, 3),
                                     "per_unit_median": round(sorted(per_unit)[len(per_unit) // 2] * 1000, 3),
                                     "checks_per_batch": iterations, "batches": repeats}
                if profile is not None:
                    profiler = cProfile.Profile(time.process_time)  # CPU time: load elsewhere does not count
                    profiler.enable()
                    for raw in batches[repeats]:
                        await service.Check(parse(raw), context)
                    profiler.disable()
                    profiler.dump_stats(str(profile.with_suffix(f".{scenario}.prof")))
            if steps:  # last: the probes stay in place
                raw = check_requests(1, False, [ACME_KEY, GLOBEX_KEY])[0]
                results["steps_us_per_check"] = await _steps(service, sidecar.authorizer, raw, parse, context,
                                                             iterations, repeats)
        finally:
            await server.stop(sidecar, 0)
    return results


def compare(before: Path, after: Path, top: int, checks: int) -> None:
    """Own time per check of each function, after minus before, largest differences first."""

    def own(path: Path) -> dict[str, tuple[float, int]]:
        stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
        out: dict[str, tuple[float, int]] = {}
        for (file, line, name), (_cc, calls, tottime, _ct, _callers) in stats.items():
            key = f"{_short(file)}:{name}"
            t, c = out.get(key, (0.0, 0))
            out[key] = (t + tottime, c + calls)
        return out

    a, b = own(before), own(after)
    rows = []
    for key in set(a) | set(b):
        ta, ca = a.get(key, (0.0, 0))
        tb, cb = b.get(key, (0.0, 0))
        rows.append((tb - ta, key, ta, tb, ca, cb))
    rows.sort(key=lambda r: -abs(r[0]))
    total_a, total_b = sum(t for t, _ in a.values()), sum(t for t, _ in b.values())
    print(f"profiled own time per check: before {total_a / checks * 1e6:.1f} us, after {total_b / checks * 1e6:.1f} us "
          "(cProfile inflates both)")
    print(f"{'diff us':>8} {'before':>8} {'after':>8} {'calls b':>8} {'calls a':>8}  function")
    for diff, key, ta, tb, ca, cb in rows[:top]:
        print(f"{diff / checks * 1e6:8.2f} {ta / checks * 1e6:8.2f} {tb / checks * 1e6:8.2f} "
              f"{ca / checks:8.2f} {cb / checks:8.2f}  {key}")


def _short(file: str) -> str:
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    for top in ("sidecar/", "common/", "kernelgate/", "otel/", "bench/"):
        idx = file.rfind("/" + top)
        if idx >= 0:
            return file[idx + 1:]
    return file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["wasm", "server"], default="wasm", help="in-process Wasm, or an OPA server")
    parser.add_argument("--iterations", type=int, default=2000, help="checks per batch")
    parser.add_argument("--repeats", type=int, default=7, help="batches; the best is reported")
    parser.add_argument("--profile", type=Path, help="write cProfile stats of one more batch (FILE.<scenario>.prof)")
    parser.add_argument("--steps", action="store_true", help="also time each step of a repeated check")
    parser.add_argument("--decision-log", action="store_true",
                        help="decision log on (to /dev/null) as deployed by default; gateway.py turns it off")
    parser.add_argument("--scenarios", nargs="+", choices=["repeated", "distinct"], default=["repeated", "distinct"])
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--tree", default=str(ROOT),
                        help="the tree measured (put it on PYTHONPATH too): its policies, and the label of the result")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                        help="print the per-function difference of two --profile files and exit")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare, args.top, args.iterations)
        return
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        config_path, procs = write_config(Path(tmp), args.mode, Path(args.tree), args.decision_log)
        try:
            try:
                import uvloop
            except ImportError:  # pragma: no cover
                run = asyncio.run
            else:
                run = uvloop.run
            results = run(measure(config_path, args.iterations, args.repeats, args.profile, args.steps,
                                  tuple(args.scenarios)))
        finally:
            for proc in procs:
                proc.stop()
    record = {"command": "python bench/check_profile.py " + " ".join(sys.argv[1:]), "tree": args.tree,
              "mode": args.mode, "python": platform.python_version(), "machine": platform.machine(),
              "measure": "process CPU time per check (every thread), best and median of the batches; per_unit: "
                         "the same over the CPU time of a fixed workload run before each batch, x 1000", **results}
    print(json.dumps(record, indent=2))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
