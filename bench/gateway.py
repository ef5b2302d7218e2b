"""kernelgate against its rivals, side by side, interleaved: the ext_authz check and the whole gate.

All systems are up at once, each behind its own Envoy (one worker) in front of one shared
upstream (an Envoy answering 200 from a direct response, never the bottleneck). A *round*
gives every system one short window at every load point (open loop at ``--rates``, closed loop
at ``--concurrency``), the system order reversed every other round, so drift of the shared
machine falls on every system alike. Ratios are computed per round and pooled (median of the
per-round ratios) with a bootstrap 90 % interval over rounds.

Systems (``--systems``):

- ``envoy_only``: no ext_authz.
- ``opa_envoy``: Envoy + OPA-Envoy (the rival, ``~/.cache/kernelgate/bin/opa-envoy-plugin``)
  evaluating ``gateway_policies/policy_only.rego`` (a header, the path and the body decide).
- ``kg_<transport>_<mode>[_w2]``: Envoy + kernelgate with the same policy; transport ``grpc``
  (Check) or ``http`` (http_service, sidecar/http_transport.py); policy ``server`` (OPA) or
  ``wasm`` (in process); ``_w2``: two worker processes on one port (SO_REUSEPORT). Any such
  name can be asked for; the default list has the HTTP transport in both policy modes, gRPC
  with Wasm, and the best mode with two workers.
- ``anchor``: the whole gate as people build it today: Envoy + OPA-Envoy (``anchor_gate.rego``
  checks the API key and returns the tenant) + Envoy's ``ratelimit`` filter calling
  envoyproxy/ratelimit on Redis (per-tenant and model limits, never reached; failure_mode_deny).
- ``kg_gate_<transport>_<mode>[_w2]``: Envoy + kernelgate doing API-key identity, the same
  allow rule (``kernelgate_gate.rego``) and Redis budgets, never reached (a Redis reply slower
  than 1 s is a 503, as the anchor's filter denies: no quiet fall back to local budgets).
- ``grpc_noop``: a gRPC Check server that does nothing (``bench/noop_authz.py``): the floor.
- ``<kernelgate system>@<tag>``: the same system with the sidecar of another tree
  (``--tree <tag>=<dir>``: its processes run with ``PYTHONPATH=<dir>`` from ``<dir>``), up side by
  side with this tree's and interleaved with it, so a change's before and after share every round's
  drift. Written under ``ratios.trees``: this tree's system over the other tree's, per round.

    git worktree add /tmp/before 2b0e0a4
    python bench/gateway.py --tree before=/tmp/before --systems envoy_only kg_grpc_wasm kg_grpc_wasm@before \
        --workloads distinct --out /tmp/ba   # before/after of a change (bench/gateway_before_after.sh)

Workloads (``--workloads``): ``distinct`` (every request body differs: no cache can help) and
``realistic`` (three tenants, four models, two routes, a few prompts, repeating; run by the rivals
and kernelgate's HTTP + Wasm modes, ``REALISTIC_SYSTEMS``). Rates 100-750 req/s in fine steps by
default, 3 s windows: on a shared 2-core machine the systems' max req/s at p99 <= 10 ms lies between
100 and 500, and steps of 250 made the per-round ratios too coarse to decide (1000 added nothing:
no system but Envoy alone held it).

    python bench/gateway.py                 # full run (~30 min on 2 cores); writes bench/results/
    python bench/gateway.py --workloads distinct --systems envoy_only opa_envoy kg_http_wasm \
        kg_http_wasm_w2 anchor kg_gate_http_wasm kg_gate_http_wasm_w2 --rounds 7 \
        --pool-with bench/results/authz_vs_opa.json   # more rounds of the compared systems, pooled
    python bench/gateway.py --quick         # smoke check (< 3 min), writes under /tmp unless --out

The duration is printed before the load starts: systems x load points x window x rounds x
workloads, plus start-up and one warm-up second per system and workload.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.processes import Proc, find_binary, free_port, start, wait_http, wait_tcp  # noqa: E402
from kernelgate.envoy_config import EnvoyConfig, render  # noqa: E402
from kernelgate.policy_bundle import build_wasm_bundle  # noqa: E402
from sidecar.config import OpaConfig  # noqa: E402
from sidecar.identity import hash_api_key  # noqa: E402

POLICIES = Path(__file__).resolve().parent / "gateway_policies"
TENANTS = {f"kg-bench-{t}-0123456789": t for t in ("acme", "globex", "initech")}
MODELS = ["tiny-gpt2", "gpt2", "gpt2-medium", "opt-125m"]
ROUTES = ["/v1/completions", "/v1/chat/completions"]
POLICY_ONLY = ("opa_envoy", "kg_grpc_wasm", "kg_http_server", "kg_http_wasm", "kg_http_wasm_w2")
GATES = ("anchor", "kg_gate_grpc_wasm", "kg_gate_http_wasm", "kg_gate_http_wasm_w2")
DEFAULT_SYSTEMS = ("envoy_only", *POLICY_ONLY, *GATES)
# --quick: the rivals and kernelgate's best mode (HTTP transport, Wasm policy, two workers)
QUICK_SYSTEMS = ("envoy_only", "opa_envoy", "kg_http_wasm_w2", "anchor", "kg_gate_http_wasm_w2")
# The realistic workload (no target is judged on it) runs the rivals and kernelgate's HTTP + Wasm
# modes only, so that the full run, with rates low enough for a 2-core machine, stays ~17 min.
REALISTIC_SYSTEMS = ("envoy_only", "opa_envoy", "kg_http_wasm", "kg_http_wasm_w2", "anchor", "kg_gate_http_wasm_w2")
# Offered rates (open loop): low enough that the max sustained req/s at p99 <= 10 ms is defined on
# a 2-core machine (where even Envoy alone missed it at 500 req/s), up to past saturation.
DEFAULT_RATES = (100, 150, 200, 300, 400, 500, 750)
P99_TARGET_MS = 10.0


@dataclass
class System:
    name: str
    url: str
    procs: list[Proc] = field(default_factory=list)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


# --- starting the systems --------------------------------------------------------------------
def start_upstream(workdir: Path) -> tuple[Proc, int]:
    """An Envoy that answers every request with a small JSON body."""
    port, admin = free_port(), free_port()
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [{
            "name": "upstream",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                             ".HttpConnectionManager",
                    "stat_prefix": "upstream",
                    "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": '{"ok": true}'}}}]}]},
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                }}]}],
        }]},
    }
    path = workdir / "upstream-envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = start("upstream", [find_binary("envoy"), "-c", str(path), "--use-dynamic-base-id",
                              "--concurrency", "1", "--log-level", "error"], workdir / "logs")
    wait_tcp(port, proc=proc)
    return proc, port


def start_envoy(workdir: Path, name: str, cfg: EnvoyConfig, patch=None) -> Proc:
    bootstrap = render(cfg)
    if patch is not None:
        patch(bootstrap)
    path = workdir / f"{name}-envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    proc = start(f"{name}-envoy", [find_binary("envoy"), "-c", str(path), "--use-dynamic-base-id",
                                   "--concurrency", "1", "--log-level", "error"], workdir / "logs")
    wait_http(f"http://127.0.0.1:{cfg.admin_port}/ready", proc=proc)
    return proc


def envoy_for(workdir: Path, name: str, upstream_port: int, authz_port: int | None, transport: str = "grpc",
              patch=None) -> tuple[Proc, str]:
    port = free_port()
    cfg = EnvoyConfig(listen_port=port, admin_port=free_port(), authz_enabled=authz_port is not None,
                      authz_address=f"127.0.0.1:{authz_port or 1}", authz_transport=transport,
                      upstream_address=f"127.0.0.1:{upstream_port}")
    return start_envoy(workdir, name, cfg, patch), f"http://127.0.0.1:{port}"


def start_redis(workdir: Path, name: str) -> tuple[Proc, int]:
    port = free_port()
    proc = start(name, [find_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no"], workdir / "logs")
    wait_tcp(port, proc=proc)
    return proc, port


def rival(name: str) -> str | None:
    found = shutil.which(name) or Path.home() / ".cache/kernelgate/bin" / name
    return str(found) if Path(found).exists() else None


def start_opa_envoy(workdir: Path, name: str, policy: Path, data: Path | None = None) -> tuple[Proc, int]:
    grpc_port = free_port()
    http_port = free_port()
    args = [rival("opa-envoy-plugin"), "run", "--server", "--addr", f"127.0.0.1:{http_port}",
            "--log-level", "error", "--set", f"plugins.envoy_ext_authz_grpc.addr=127.0.0.1:{grpc_port}",
            "--set", "plugins.envoy_ext_authz_grpc.path=envoy/authz/result",
            "--set", "decision_logs.console=false", str(policy), *([str(data)] if data else [])]
    proc = start(name, args, workdir / "logs")
    wait_tcp(grpc_port, proc=proc)
    return proc, grpc_port


def start_sidecar(workdir: Path, name: str, policy: Path, transport: str, mode: str, workers: int,
                  redis_port: int | None = None, keys: Path | None = None,
                  tree: Path | None = None) -> tuple[list[Proc], int]:
    """kernelgate with ``policy`` (the code of ``tree``, default this one); returns its processes and
    the port Envoy must call."""
    policy_dir = workdir / f"{name}-policy"
    policy_dir.mkdir()
    shutil.copy(policy, policy_dir / "policy.rego")
    procs: list[Proc] = []
    if mode == "wasm":
        opa = {"mode": "wasm", "wasm_bundle_file": str(build_wasm_bundle(
            policy_dir, workdir / f"{name}-bundle.tar.gz", OpaConfig().policy_path))}
    else:
        opa_port = free_port()
        procs.append(start(f"{name}-opa", [find_binary("opa"), "run", "--server", "--addr",
                                           f"127.0.0.1:{opa_port}", "--log-level", "error", str(policy_dir)],
                           workdir / "logs"))
        wait_http(f"http://127.0.0.1:{opa_port}/health", proc=procs[-1])
        opa = {"url": f"http://127.0.0.1:{opa_port}"}
    grpc_port, http_port = free_port(), free_port()
    authz = {
        "listen": f"127.0.0.1:{grpc_port}", "metrics_listen": "", "workers": workers,
        # vegeta numbers every request (x-vegeta-seq); like x-request-id, no policy reads it.
        "opa": {**opa, "revision_paths": [], "cache_ignore_headers": [*OpaConfig().cache_ignore_headers,
                                                                       "x-vegeta-seq"]},
        "decision_log": {"enabled": False},
        # no inference replicas here: left to its default the sidecar would poll the replicas
        # Envoy routes to (the config's default upstream), which no one serves: a failed connect
        # every 0.25 s, ~5 % of the sidecar's CPU at 800 checks/s (bench/gate_profile.py)
        "replicas": {"targets": []},
    }
    if transport == "http":
        authz["http_listen"] = f"127.0.0.1:{http_port}"
    if keys is not None:
        authz["identity"] = {"api_keys_file": str(keys)}
    if redis_port is None:
        authz["ratelimit"] = {"enabled": False}  # the policy-only systems: OPA-Envoy limits nothing either
    else:
        # as the anchor's ratelimit filter (failure_mode_deny, 1 s): a slow Redis is an error here,
        # never a quiet fall back to this process's own budgets (cheaper, and not the gate measured)
        authz["ratelimit"] = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0",
                              "redis_timeout_s": 1.0, "redis_failure_mode": "deny"}
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump({"authz": authz}))
    sidecar = start(name, [sys.executable, "-m", "kernelgate.cli", "--log-level", "warning", "authz",
                           "--config", str(config_path)], workdir / "logs",
                    env={"PYTHONPATH": str(tree)} if tree else None, cwd=tree)
    port = http_port if transport == "http" else grpc_port
    wait_tcp(port, timeout=180, proc=sidecar)  # a loaded machine can take a while to import
    return [*procs, sidecar], port


def write_key_files(workdir: Path) -> tuple[Path, Path]:
    """The same three API keys for kernelgate (its key file) and the anchor's Rego (data.keys)."""
    kg = workdir / "api-keys.yaml"
    kg.write_text(yaml.safe_dump({hash_api_key(k): {"tenant": t, "tier": "pro", "scopes": ["*"], "name": t}
                                  for k, t in TENANTS.items()}))
    import hashlib

    data_dir = workdir / "anchor-data"
    data_dir.mkdir()
    data = data_dir / "data.json"
    data.write_text(json.dumps({"keys": {hashlib.sha256(k.encode()).hexdigest(): {"tenant": t}
                                         for k, t in TENANTS.items()}}))
    return kg, data


def anchor_patch(ratelimit_port: int):
    """Envoy's ratelimit filter after ext_authz, descriptor (tenant, model) from OPA-Envoy's headers."""
    def patch(bootstrap: dict) -> None:
        resources = bootstrap["staticResources"]
        hcm = resources["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
        hcm["httpFilters"].insert(-1, {"name": "envoy.filters.http.ratelimit", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            "domain": "bench", "failureModeDeny": True, "timeout": "1s",
            "rateLimitService": {"transportApiVersion": "V3",
                                 "grpcService": {"envoyGrpc": {"clusterName": "ratelimit"}}}}})
        route = hcm["routeConfig"]["virtualHosts"][0]["routes"][0]["route"]
        route["rateLimits"] = [{"actions": [
            {"requestHeaders": {"headerName": "x-tenant", "descriptorKey": "tenant"}},
            {"requestHeaders": {"headerName": "x-model", "descriptorKey": "model"}}]}]
        authz_cluster = next(c for c in resources["clusters"] if c["name"] == "kernelgate_authz")
        cluster = json.loads(json.dumps(authz_cluster))
        cluster["name"] = cluster["loadAssignment"]["clusterName"] = "ratelimit"
        cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"][
            "portValue"] = ratelimit_port
        resources["clusters"].append(cluster)
    return patch


def start_anchor(workdir: Path, upstream_port: int) -> System:
    data = workdir / "anchor-data/data.json"  # write_key_files
    redis, redis_port = start_redis(workdir, "anchor-redis")
    runtime = workdir / "ratelimit-runtime"
    (runtime / "ratelimit/config").mkdir(parents=True)
    (runtime / "ratelimit/config/bench.yaml").write_text(yaml.safe_dump({"domain": "bench", "descriptors": [
        {"key": "tenant", "descriptors": [{"key": "model", "rate_limit": {"unit": "minute",
                                                                         "requests_per_unit": 1_000_000_000}}]}]}))
    rl_grpc, rl_http, rl_debug = free_port(), free_port(), free_port()
    ratelimit = start("anchor-ratelimit", [rival("ratelimit")], workdir / "logs", env={
        "USE_STATSD": "false", "LOG_LEVEL": "warn", "REDIS_SOCKET_TYPE": "tcp",
        "REDIS_URL": f"127.0.0.1:{redis_port}", "RUNTIME_ROOT": str(runtime), "RUNTIME_SUBDIRECTORY": "ratelimit",
        "RUNTIME_WATCH_ROOT": "false", "HOST": "127.0.0.1", "PORT": str(rl_http), "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": str(rl_grpc), "DEBUG_HOST": "127.0.0.1", "DEBUG_PORT": str(rl_debug)})
    wait_tcp(rl_grpc, proc=ratelimit)
    opa_envoy, authz_port = start_opa_envoy(workdir, "anchor-opa-envoy", POLICIES / "anchor_gate.rego", data)
    envoy, url = envoy_for(workdir, "anchor", upstream_port, authz_port, patch=anchor_patch(rl_grpc))
    return System("anchor", url, [redis, ratelimit, opa_envoy, envoy])


def start_system(name: str, workdir: Path, upstream_port: int, trees: dict[str, Path] | None = None) -> System:
    """One system by its name (module docstring); ``kg_…@tag`` runs the sidecar of ``trees[tag]``."""
    base, _, tag = name.partition("@")
    tree = (trees or {})[tag] if tag else None
    if tag and not base.startswith("kg_"):
        raise SystemExit(f"{name}: only kernelgate systems take another tree")
    if name == "envoy_only":
        envoy, url = envoy_for(workdir, name, upstream_port, None)
        return System(name, url, [envoy])
    if name == "grpc_noop":
        port = free_port()
        noop = start("noop-authz", [sys.executable, str(ROOT / "bench/noop_authz.py"), f"127.0.0.1:{port}"],
                     workdir / "logs")
        wait_tcp(port, proc=noop)
        envoy, url = envoy_for(workdir, name, upstream_port, port)
        return System(name, url, [noop, envoy])
    if name == "opa_envoy":
        proc, port = start_opa_envoy(workdir, "opa-envoy", POLICIES / "policy_only.rego")
        envoy, url = envoy_for(workdir, name, upstream_port, port)
        return System(name, url, [proc, envoy])
    if name == "anchor":
        return start_anchor(workdir, upstream_port)
    parts = base.split("_")
    workers = 2 if parts[-1] == "w2" else 1
    if parts[1] == "gate":  # kg_gate_<transport>_<mode>[_w2]
        transport, mode = parts[2], parts[3]
        keys = workdir / "api-keys.yaml"  # write_key_files
        redis, redis_port = start_redis(workdir, f"{name}-redis")
        procs, port = start_sidecar(workdir, name.replace("@", "-"), POLICIES / "kernelgate_gate.rego", transport,
                                    mode, workers, redis_port, keys, tree)
        envoy, url = envoy_for(workdir, name, upstream_port, port, transport)
        return System(name, url, [redis, *procs, envoy])
    transport, mode = parts[1], parts[2]  # kg_<transport>_<mode>[_w2]
    procs, port = start_sidecar(workdir, name.replace("@", "-"), POLICIES / "policy_only.rego", transport, mode,
                                workers, tree=tree)
    envoy, url = envoy_for(workdir, name, upstream_port, port, transport)
    return System(name, url, [*procs, envoy])


# --- load -----------------------------------------------------------------------------------
def request_body(i: int, workload: str, rng: random.Random) -> tuple[str, dict]:
    """The ``i``-th request's route and body: ``distinct`` (its own prompt) or ``realistic`` (one of four)."""
    model, route = MODELS[i % len(MODELS)], ROUTES[(i // len(MODELS)) % len(ROUTES)]
    prompt = f"benchmark prompt number {i}" if workload == "distinct" else f"prompt {rng.randrange(4)}"
    return route, {"model": model, "max_tokens": 16,
                   **({"messages": [{"role": "user", "content": prompt}]} if "chat" in route else {"prompt": prompt})}


def write_targets(path: Path, url: str, workload: str, gate: bool, count: int) -> None:
    """vegeta targets: ``distinct`` (every body differs) or ``realistic`` (few, repeating)."""
    rng = random.Random(7)
    keys = list(TENANTS)
    with path.open("w") as fh:
        for i in range(count if workload == "distinct" else 48):
            route, body = request_body(i, workload, rng)
            header = {"content-type": ["application/json"]}
            if gate:
                header["x-api-key"] = [keys[i % len(keys)]]
            else:
                header["x-user"] = [f"user-{i % 3}"]
            fh.write(json.dumps({"method": "POST", "url": url + route,
                                 "body": base64.b64encode(json.dumps(body).encode()).decode(),
                                 "header": header}) + "\n")


def cpu_seconds(procs: list[Proc]) -> float:
    """User + system CPU of these processes and their children (sidecar workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    roots = {p.popen.pid for p in procs}
    total = 0.0
    for pid, (ppid, cpu) in stats.items():
        if pid in roots or ppid in roots:
            total += cpu
    return total


def attack(system: System, targets: Path, duration_s: float, rate: int = 0, concurrency: int = 0) -> dict:
    """One vegeta window: open loop at ``rate`` req/s, or closed loop with ``concurrency`` workers."""
    args = [find_binary("vegeta"), "attack", "-format=json", f"-targets={targets}", f"-duration={duration_s}s",
            "-timeout=5s", "-keepalive=true"]
    if rate:
        args += [f"-rate={rate}/s", "-workers=16", "-max-workers=512"]
    else:
        args += ["-rate=0", f"-workers={concurrency}", f"-max-workers={concurrency}"]
    cpu_before = cpu_seconds(system.procs)
    attack_proc = subprocess.run(args, capture_output=True, check=True)
    cpu_after = cpu_seconds(system.procs)
    report = json.loads(subprocess.run([find_binary("vegeta"), "report", "-type=json"], input=attack_proc.stdout,
                                       capture_output=True, check=True).stdout)
    lat, requests = report["latencies"], report["requests"]
    return {
        "system": system.name, "mode": "open" if rate else "closed", "rate": rate, "concurrency": concurrency,
        "requests": requests, "throughput_rps": round(report["throughput"], 1),
        "p50_ms": lat["50th"] / 1e6, "p90_ms": lat["90th"] / 1e6, "p99_ms": lat["99th"] / 1e6,
        "max_ms": lat["max"] / 1e6, "errors": requests - report["status_codes"].get("200", 0),
        "status_codes": report["status_codes"],
        "cpu_ms_per_request": round((cpu_after - cpu_before) / max(requests, 1) * 1000, 4),
    }


# --- statistics -----------------------------------------------------------------------------
def pooled(ratios: list[float], draws: int = 4000, seed: int = 7) -> dict:
    """Median of per-round ratios with a bootstrap 90 % interval (rounds resampled)."""
    ratios = [r for r in ratios if r is not None and math.isfinite(r)]
    if not ratios:
        return {"ratio": None, "interval90": None, "rounds": 0}
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return {"ratio": round(statistics.median(ratios), 3),
            "interval90": [round(boot[int(0.05 * draws)], 3), round(boot[int(math.ceil(0.95 * draws)) - 1], 3)],
            "rounds": len(ratios), "per_round": [round(r, 3) for r in ratios]}


def sustained(rows: list[dict]) -> float:
    """Highest offered rate of one round served with p99 <= 10 ms, no errors, >= 95 % of the rate."""
    good = [r["rate"] for r in rows if r["mode"] == "open" and r["p99_ms"] <= P99_TARGET_MS and r["errors"] == 0
            and r["throughput_rps"] >= 0.95 * r["rate"]]
    return float(max(good, default=0))


def summarize(rows: list[dict], systems: list[str], rates: list[int], rounds: int) -> dict:
    out: dict = {}
    for workload in sorted({r["workload"] for r in rows}):
        w = [r for r in rows if r["workload"] == workload]
        present = {r["system"] for r in w}
        systems_here = [s for s in systems if s in present]

        def pick(system, rnd, **match):
            return next((r for r in w if r["system"] == system and r["round"] == rnd
                         and all(r[k] == v for k, v in match.items())), None)

        rate_ref = 500 if 500 in rates else rates[len(rates) // 2]
        per_system = {}
        for s in systems_here:
            srows = [r for r in w if r["system"] == s]
            at_ref = [r for r in srows if r["mode"] == "open" and r["rate"] == rate_ref]
            closed = [r for r in srows if r["mode"] == "closed"]
            per_system[s] = {
                f"p99_ms_at_{rate_ref}": round(statistics.median(r["p99_ms"] for r in at_ref), 2) if at_ref else None,
                f"p50_ms_at_{rate_ref}": round(statistics.median(r["p50_ms"] for r in at_ref), 2) if at_ref else None,
                "max_rps_p99_le_10ms_per_round": [sustained([r for r in srows if r["round"] == k])
                                                  for k in range(rounds)],
                "closed_loop_rps": round(statistics.median(r["throughput_rps"] for r in closed), 1) if closed else None,
                f"cpu_ms_per_request_at_{rate_ref}": round(statistics.median(r["cpu_ms_per_request"]
                                                                             for r in at_ref), 4) if at_ref else None,
                "p99_ms_by_rate": {rate: round(statistics.median(r["p99_ms"] for r in srows
                                                                 if r["mode"] == "open" and r["rate"] == rate), 2)
                                   for rate in rates if any(r["mode"] == "open" and r["rate"] == rate for r in srows)},
            }
        alone_cpu = (per_system.get("envoy_only") or {}).get(f"cpu_ms_per_request_at_{rate_ref}")
        for s, v in per_system.items():
            cpu = v[f"cpu_ms_per_request_at_{rate_ref}"]
            v["cpu_ms_per_check"] = round(cpu - alone_cpu, 4) if cpu is not None and alone_cpu is not None \
                and s != "envoy_only" else None

        def cpu_ratios(a: str, b: str) -> dict:
            """a's CPU per check over b's, each minus Envoy alone's of the same round, at the reference rate."""
            def per_check(system: str, k: int) -> float:
                row, alone = pick(system, k, mode="open", rate=rate_ref), pick("envoy_only", k, mode="open",
                                                                              rate=rate_ref)
                if row is None or alone is None:
                    return math.nan
                return row["cpu_ms_per_request"] - alone["cpu_ms_per_request"]
            return pooled([per_check(a, k) / per_check(b, k) for k in range(rounds)])

        def ratios(a: str, b: str) -> dict:
            p99 = [(pick(a, k, mode="open", rate=rate_ref) or {}).get("p99_ms", math.nan)
                   / (pick(b, k, mode="open", rate=rate_ref) or {}).get("p99_ms", math.nan) for k in range(rounds)]
            rps = []
            for k in range(rounds):
                ours = sustained([r for r in w if r["system"] == a and r["round"] == k])
                theirs = sustained([r for r in w if r["system"] == b and r["round"] == k])
                # neither met the target at any rate: no ratio this round; only theirs failed: ours
                # over half the lowest rate (a lower bound)
                rps.append(math.nan if ours == theirs == 0 else ours / max(theirs, min(rates) / 2))
            closed = [(pick(a, k, mode="closed") or {}).get("throughput_rps", math.nan)
                      / (pick(b, k, mode="closed") or {}).get("throughput_rps", math.nan) for k in range(rounds)]
            return {"p99": pooled(p99), "rps": pooled(rps), "closed_loop_rps": pooled(closed)}

        comparisons = {}
        this_tree = [s for s in systems if s.startswith("kg_") and "@" not in s]
        for rivalname, ours in (("opa_envoy", [s for s in this_tree if "gate" not in s]),
                                ("anchor", [s for s in this_tree if s.startswith("kg_gate")])):
            if rivalname in systems_here:
                comparisons[rivalname] = {s: ratios(s, rivalname) for s in ours if s in systems_here}
        # this tree's system over the same system of another tree (``name@tag``), per round
        trees = {other: {**ratios(other.partition("@")[0], other), "cpu_ms_per_check": cpu_ratios(
            other.partition("@")[0], other)} for other in systems_here
            if "@" in other and other.partition("@")[0] in systems_here}
        if trees:
            comparisons["trees"] = trees
        out[workload] = {"reference_rate": rate_ref, "systems": per_system, "ratios": comparisons}
    return out


def best(comparison: dict) -> tuple[str | None, dict | None]:
    """Our system with the lowest pooled p99 ratio against the rival (every one is in the file)."""
    scored = [(v["p99"]["ratio"], s) for s, v in comparison.items() if v["p99"]["ratio"] is not None]
    if not scored:
        return None, None
    name = min(scored)[1]
    return name, comparison[name]


# --- the run --------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> list[dict]:
    workdir = Path(tempfile.mkdtemp(prefix="kernelgate-bench-"))
    upstream, upstream_port = start_upstream(workdir)
    systems: dict[str, System] = {}
    rows: list[dict] = []
    write_key_files(workdir)
    try:
        for name in args.systems:
            if name in ("opa_envoy", "anchor") and not (rival("opa-envoy-plugin") and rival("ratelimit")):
                print(f"skipping {name}: the rival binaries are not built (../shared/rivals/build.sh)", flush=True)
                continue
            systems[name] = start_system(name, workdir, upstream_port, args.trees)
            print(f"started {name} at {systems[name].url}", flush=True)
        for workload in args.workloads:
            here = workload_systems(list(systems), workload)
            targets = {}
            for name in here:
                system = systems[name]
                targets[name] = workdir / f"{name}-{workload}.targets"
                write_targets(targets[name], system.url, workload, gate=name == "anchor" or "gate" in name,
                              count=args.distinct)
                attack(system, targets[name], 1.0, rate=200)  # warm-up: connections, caches
            points = [("open", r) for r in args.rates] + [("closed", c) for c in args.concurrency]
            for rnd in range(args.rounds):
                order = here if rnd % 2 == 0 else list(reversed(here))
                for kind, value in points:
                    for name in order:
                        row = attack(systems[name], targets[name], args.window,
                                     rate=value if kind == "open" else 0, concurrency=value if kind == "closed" else 0)
                        rows.append({**row, "workload": workload, "round": rnd})
                        print(json.dumps(rows[-1]), flush=True)
    finally:
        for system in systems.values():
            system.stop()
        upstream.stop()
    return rows


def workload_systems(systems: list[str], workload: str) -> list[str]:
    """The systems a workload's rounds run (all for ``distinct``; ``REALISTIC_SYSTEMS`` of them else)."""
    return systems if workload == "distinct" else [s for s in systems if s in REALISTIC_SYSTEMS]


def write_plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(summary)
    fig, axes = plt.subplots(1, len(workloads), figsize=(7 * len(workloads), 4.8), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        for system, v in summary[workload]["systems"].items():
            pts = sorted((int(rate), p99) for rate, p99 in v["p99_ms_by_rate"].items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system,
                    linestyle="--" if system in ("opa_envoy", "anchor", "envoy_only") else "-")
        ax.axhline(P99_TARGET_MS, color="grey", linewidth=0.8)
        ax.set_xlabel("offered load (req/s, open loop)")
        ax.set_ylabel("p99 latency (ms), median over rounds")
        ax.set_yscale("log")
        ax.set_title(f"{workload} inputs: all systems interleaved, same machine")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS))
    parser.add_argument("--workloads", nargs="+", default=["distinct", "realistic"],
                        choices=["distinct", "realistic"])
    parser.add_argument("--rates", nargs="+", type=int, default=list(DEFAULT_RATES))
    parser.add_argument("--concurrency", nargs="*", type=int, default=[16])
    parser.add_argument("--window", type=float, default=3.0, help="seconds per system per load point")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--distinct", type=int, default=20000, help="bodies in the distinct workload")
    parser.add_argument("--quick", action="store_true", help="smoke check: few systems, one short round")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--pool-with", nargs="*", type=Path, default=[], metavar="RESULT",
                        help="earlier authz_vs_opa.json files of the same systems and rates: their rounds are pooled "
                             "with this run's (each run's machine drift stays inside its own rounds)")
    parser.add_argument("--tree", action="append", default=[], metavar="TAG=DIR",
                        help="another checkout whose sidecar the systems named NAME@TAG run (repeatable)")
    args = parser.parse_args()
    args.trees = {}
    for item in args.tree:
        tag, sep, folder = item.partition("=")
        if not sep or not tag or not Path(folder, "sidecar").is_dir():
            parser.error(f"--tree {item!r}: want TAG=DIR, DIR a kernelgate checkout")
        args.trees[tag] = Path(folder).resolve()
    unknown = {s.partition("@")[2] for s in args.systems if "@" in s} - set(args.trees)
    if unknown:
        parser.error(f"systems name trees not given with --tree: {sorted(unknown)}")
    if args.quick:
        args.systems = [s for s in args.systems if s in QUICK_SYSTEMS]
        args.workloads, args.rates, args.concurrency = args.workloads[:1], [100, 500], [16]
        args.window, args.rounds, args.distinct = 1.0, 2, 2000
    points = len(args.rates) + len(args.concurrency)
    windows = sum(len(workload_systems(args.systems, w)) for w in args.workloads) * points * args.rounds
    # measured: ~0.3 s per window beyond its length (vegeta start, CPU sampling), ~12 s start-up per system
    print(f"{windows} windows ({args.systems and len(args.systems)} systems, {points} load points, "
          f"{args.rounds} rounds, {len(args.workloads)} workloads) x {args.window:g} s: "
          f"~{(windows * (args.window + 0.3) + 12 * len(args.systems)) / 60:.1f} min with start-up", flush=True)
    out = args.out or (Path(tempfile.mkdtemp(prefix="kernelgate-bench-quick-")) if args.quick
                       else ROOT / "bench/results")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = run(args)
    rounds = args.rounds
    for earlier in args.pool_with:  # earlier runs' rounds count as more rounds of this one
        before = json.loads(earlier.read_text())
        if before.get("rates", args.rates) != args.rates:
            raise SystemExit(f"--pool-with {earlier}: rates {before.get('rates')} differ from {args.rates}")
        rows += [{**r, "round": r["round"] + rounds, "run": str(earlier)} for r in before["rows"]]
        rounds += before.get("rounds", 1 + max(r["round"] for r in before["rows"]))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    summary = summarize(rows, systems, args.rates, rounds)
    command = "python " + " ".join(sys.argv)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "load_average_at_end": os.getloadavg()}
    headline: dict = {"command": command, "machine": machine, "duration_s": round(time.time() - started),
                      "method": "all systems up side by side; per round every system gets a window at every load "
                                "point, order reversed every other round; ratios per round, pooled as the median "
                                "with a bootstrap 90 % interval over rounds; max req/s = highest offered rate "
                                "with p99 <= 10 ms, no errors, >= 95 % achieved (per round)",
                      "rates": args.rates, "rounds": rounds, "pooled_with": [str(p) for p in args.pool_with],
                      "workloads": summary}
    distinct = summary.get("distinct") or next(iter(summary.values()))
    kg_name, vs_opa = best(distinct["ratios"].get("opa_envoy", {}))
    gate_name, vs_anchor = best(distinct["ratios"].get("anchor", {}))
    rate_ref = distinct["reference_rate"]
    headline.update({
        "kernelgate_vs_opa_envoy_system": kg_name,
        "ratio_rps_kernelgate_over_opa_envoy": vs_opa and vs_opa["rps"],
        f"ratio_p99_kernelgate_over_opa_envoy": vs_opa and {**vs_opa["p99"], "at_rps": rate_ref},
        "kernelgate_vs_anchor_system": gate_name,
        "ratio_rps_kernelgate_over_anchor_stack": vs_anchor and vs_anchor["rps"],
        "ratio_p99_kernelgate_over_anchor_stack": vs_anchor and {**vs_anchor["p99"], "at_rps": rate_ref},
        "cpu_ms_per_check": {s: v["cpu_ms_per_check"] for s, v in distinct["systems"].items()},
        "targets": {"ratio_rps_kernelgate_over_opa_envoy": ">= 1.0", "ratio_p99_kernelgate_over_opa_envoy": "<= 1.0",
                    "ratio_rps_kernelgate_over_anchor_stack": ">= 1.5",
                    "ratio_p99_kernelgate_over_anchor_stack": "<= 1.0"},
        "rows": rows,
    })
    (out / "authz_vs_opa.json").write_text(json.dumps(headline, indent=2) + "\n")
    alone = distinct["systems"].get("envoy_only", {}).get(f"p99_ms_at_{rate_ref}")
    added = {s: round(v[f"p99_ms_at_{rate_ref}"] - alone, 3)
             for s, v in distinct["systems"].items()
             if s.startswith("kg_") and "gate" not in s and "@" not in s and alone is not None
             and v[f"p99_ms_at_{rate_ref}"] is not None}
    best_mode = min(added, key=added.get) if added else None
    (out / "authz.json").write_text(json.dumps({
        "command": command, "machine": machine, "at_rps": rate_ref,
        f"added_p99_ms_at_500rps": added.get(best_mode) if best_mode else None,
        "added_p99_mode": best_mode, "added_p99_by_mode": added,
        "envoy_only_p99_ms": alone, "target_added_p99_ms_at_500rps": 1.0,
        "note": "measured in the same interleaved run as authz_vs_opa.json (distinct inputs)",
    }, indent=2) + "\n")
    write_plot(out / "authz_vs_opa.png", summary)
    print(json.dumps({k: v for k, v in headline.items() if k not in ("rows", "workloads")}, indent=1))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
