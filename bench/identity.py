"""Added cost per check of each identity method, on a cache hit and on a miss, side by side.

Starts a real Ory Hydra (in-memory, free loopback ports; built by scripts/setup.sh) for the
OIDC and introspection methods. Times ``Authenticator.authenticate`` (what a check spends on
identity) per method, minus the same call for an anonymous request, in interleaved rounds in
one process so every method sees the same machine state. Writes bench/results/identity.json.

    python bench/identity.py [--rounds 5] [--n 400] [--quick]

What "hit" and "miss" mean per method:
- api_key: no cache (the key file is in memory): hit = a known key (sha256 + dict lookup),
  miss = an unknown key (the same lookup, then the refusal).
- oidc: hit = the token cache; miss = a token not in the cache (RS256 signature and claims
  checked with the cached keys). ``key_fetch`` is one fetch of the keys (unknown kid, schedule).
- introspection: hit = the answer cache (sha256 of the token); miss = an RFC 7662 call to Hydra.
- mtls: hit = a certificate seen before; miss = a new certificate (PEM parsed, URI SAN mapped).
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
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.settings import build  # noqa: E402
from sidecar.config import IdentityConfig  # noqa: E402
from sidecar.identity import AuthError, Authenticator, make_api_key_entry  # noqa: E402
from tests.certs import issue, make_ca  # noqa: E402
from tests.hydra import Hydra, start_hydra  # noqa: E402

AUDIENCE = "kernelgate"
SPIFFE = "spiffe://cluster.local/ns/acme/sa/bench"

Check = Callable[[int], Awaitable[object]]


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


async def timed(check: Check, n: int) -> list[float]:
    samples = []
    for i in range(n):
        start = time.perf_counter_ns()
        try:
            await check(i)
        except AuthError:
            pass
        samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def summary(samples: list[float], baseline_us: float) -> dict[str, float]:
    samples = sorted(samples)
    p50 = percentile(samples, 0.5)
    return {"added_p50_us": round(p50 - baseline_us, 1), "p50_us": round(p50, 1),
            "p99_us": round(percentile(samples, 0.99), 1), "mean_us": round(statistics.fmean(samples), 1),
            "samples": len(samples)}


async def run(hydra: Hydra, tmp: Path, rounds: int, n: int) -> dict:
    key, entry = make_api_key_entry("acme", scopes=["*"])
    keys_file = tmp / "keys.json"
    keys_file.write_text(json.dumps(entry))
    jwt_secret = hydra.create_client("acme", audience=[AUDIENCE])
    opaque_secret = hydra.create_client("globex", audience=[AUDIENCE], token_strategy="opaque")
    raw = {
        "api_keys_file": str(keys_file),
        "issuers": [{"issuer": hydra.issuer, "audiences": [AUDIENCE], "check_wait_s": 5,
                     "claims": {"tenant": "client_id", "scopes": "scp", "tier": None}}],
        "introspection": {"url": hydra.introspection_url, "name": "hydra",
                          "claims": {"tenant": "client_id", "scopes": "scope", "tier": None}},
        "mtls": {"enabled": True, "identities": {SPIFFE: {"tenant": "acme"}}},
    }
    cached = Authenticator(build(IdentityConfig, raw, "authz.identity"))
    uncached = Authenticator(build(IdentityConfig, {**raw, "introspection": {**raw["introspection"], "cache_size": 0}},
                                   "authz.identity"), jwt_cache_size=0)
    jwt_token = hydra.token("acme", jwt_secret, audience=AUDIENCE)
    opaque_token = hydra.token("globex", opaque_secret, audience=AUDIENCE)
    ca = make_ca()
    seen_cert = issue(ca, "bench", uris=(SPIFFE,)).envoy_form
    # One new certificate per miss sample: made before timing (key generation is not the check's).
    fresh_certs = [[issue(ca, f"bench-{r}-{i}", uris=(SPIFFE,)).envoy_form for i in range(n)] for r in range(rounds)]
    bearer_jwt, bearer_opaque = {"authorization": f"Bearer {jwt_token}"}, {"authorization": f"Bearer {opaque_token}"}
    for auth in (cached, uncached):  # warm: keys fetched, first answers cached, certificate parsed
        await auth.authenticate(bearer_jwt)
        await auth.authenticate({"x-api-key": key})
        await auth.authenticate({}, SPIFFE, seen_cert)
    await cached.authenticate(bearer_opaque)
    issuer = cached._issuers[hydra.issuer]  # noqa: SLF001 - the bench times the key fetch alone

    samples: dict[str, list[float]] = {}

    def add(name: str, values: list[float]) -> None:
        samples.setdefault(name, []).extend(values)

    for r in range(rounds):
        add("anonymous", await timed(lambda i: cached.authenticate({}), n))
        add("api_key.hit", await timed(lambda i: cached.authenticate({"x-api-key": key}), n))
        add("api_key.miss", await timed(lambda i: cached.authenticate({"x-api-key": "kg_unknown-key"}), n))
        add("oidc.hit", await timed(lambda i: cached.authenticate(bearer_jwt), n))
        add("oidc.miss", await timed(lambda i: uncached.authenticate(bearer_jwt), n))
        add("oidc.key_fetch", await timed(lambda i: issuer.refresh(), max(5, n // 20)))
        add("introspection.hit", await timed(lambda i: cached.authenticate(bearer_opaque), n))
        add("introspection.miss", await timed(lambda i: uncached.authenticate(bearer_opaque), max(5, n // 4)))
        add("mtls.hit", await timed(lambda i: cached.authenticate({}, SPIFFE, seen_cert), n))
        certs = fresh_certs[r]
        add("mtls.miss", await timed(lambda i: cached.authenticate({}, SPIFFE, certs[i]), n))
    baseline = percentile(sorted(samples["anonymous"]), 0.5)
    methods: dict[str, dict] = {}
    for name, values in samples.items():
        if name == "anonymous":
            continue
        method, case = name.split(".")
        methods.setdefault(method, {})[case] = summary(values, baseline)
    await cached.close()
    await uncached.close()
    return {"baseline_anonymous_p50_us": round(baseline, 2), "methods": methods}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=400, help="samples per method and case in each round")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 50: checks the script works")
    parser.add_argument("--out", default=str(ROOT / "bench/results/identity.json"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.n = 2, 50
    try:
        import uvloop
        loop_name, runner = "uvloop", uvloop.run
    except ImportError:
        loop_name, runner = "asyncio", asyncio.run
    with tempfile.TemporaryDirectory() as tmp:
        hydra = start_hydra(Path(tmp) / "hydra")
        try:
            results = runner(run(hydra, Path(tmp), args.rounds, args.n))
        finally:
            hydra.stop()
    report = {
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "what": "Authenticator.authenticate per call, sequential, interleaved rounds; added_p50_us is the p50 "
                "minus an anonymous request's p50 (what the method adds to a check)",
        "device": "CPU only (no GPU involved)",
        "rounds": args.rounds,
        "n": args.n,
        "event_loop": loop_name,
        "python": platform.python_version(),
        "identity_provider": "Ory Hydra v2.3.0, DSN=memory, loopback",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "system": platform.system(),
                 "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "not_measured": {"service_account": "no kube-apiserver fixture on main yet; the path is the oidc "
                         "method's (kind: kubernetes), so its costs are the oidc numbers with the cluster's keys"},
        **results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["methods"], indent=2))


if __name__ == "__main__":
    main()
