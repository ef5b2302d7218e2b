"""Canary by policy through the whole stack (Envoy -> sidecar -> OPA -> inference server, CPU).

Rollout weights live in OPA's data and change at run time through OPA's data API; the policy
picks a version per request from the session key, the sidecar passes it in
``x-kernelgate-model-version`` (a client's own copy is stripped), and the server answers from
that version. A canary configured to fail is rolled back by the server, and the sidecar sets
its weight to 0 in OPA's data.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import aiohttp

from common.models import MODEL_VERSION_HEADER
from tests.model_stack import VersionedReplica, load_version, wait_version
from tests.procs import free_port
from tests.replica_stack import ReplicaStack, wait_for
from tests.stack import ACME_KEY

TOKEN = "e2e-admin-token"
MODEL = "tiny-gpt2"
BODY = {"model": MODEL, "prompt": "which version?", "max_tokens": 1, "temperature": 0}


def stack_with_versions(tmp_path: Path, **overrides: object) -> tuple[ReplicaStack, VersionedReplica]:
    token = tmp_path / "admin-token"
    token.write_text(TOKEN)
    replica = VersionedReplica("r0", max_batch_size=8, admin_port=free_port(), token_file=str(token), token=TOKEN,
                               overrides=dict(overrides))
    stack = ReplicaStack(tmp_path, replicas=[replica])
    # The server reports what each decision used to the sidecar (token settlement), whichever version served.
    replica.overrides["usage_report"] = {"address": f"127.0.0.1:{stack.authz_port}"}
    return stack.start(), replica


def opa_data(stack: ReplicaStack, path: str, value: object = None, method: str = "GET") -> object:
    """OPA's data API: GET the document at ``path``, or PUT ``value`` there."""
    request = urllib.request.Request(f"http://127.0.0.1:{stack.opa_port}/v1/data/{path}", method=method,
                                     data=json.dumps(value).encode() if method == "PUT" else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        body = resp.read()
    return json.loads(body).get("result") if body else None


async def ask(session: aiohttp.ClientSession, url: str, key: str | None, **headers: str) -> tuple[int, str]:
    sent = {"content-type": "application/json", "x-api-key": ACME_KEY, **headers}
    if key is not None:
        sent["x-session-id"] = key
    async with session.post(f"{url}/v1/completions", data=json.dumps(BODY), headers=sent) as resp:
        await resp.read()
        return resp.status, resp.headers.get(MODEL_VERSION_HEADER, "")


async def ask_all(url: str, keys: list[str | None], concurrency: int = 8, **headers: str) -> list[tuple[int, str]]:
    limit = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def one(key: str | None) -> tuple[int, str]:
            async with limit:
                return await ask(session, url, key, **headers)
        return await asyncio.gather(*(one(k) for k in keys))


def binomial_bound(n: int, p: float, sigmas: float = 4.5) -> tuple[float, float]:
    """[low, high] for the count of a Binomial(n, p): mean ± 4.5 standard deviations (a fair
    split falls outside with probability about 7e-6)."""
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    return mean - sigmas * sd, mean + sigmas * sd


async def test_weights_in_opa_split_traffic_by_session_and_change_at_run_time(tmp_path: Path) -> None:
    stack, replica = stack_with_versions(tmp_path)
    try:
        v2 = await asyncio.to_thread(load_version, replica, MODEL, {"version": "v2", "random_config": MODEL})
        assert v2["state"] == "ready", v2
        # No rollout in the data yet: the active version answers, whatever a client claims.
        before = await ask_all(stack.url, [None] * 4, **{MODEL_VERSION_HEADER: "v2"})
        assert before == [(200, "v1")] * 4

        opa_data(stack, f"kernelgate/rollouts/{MODEL}", {"weights": {"v1": 70, "v2": 30}}, "PUT")
        n = 300
        keys = [f"session-{uuid.uuid4().hex}" for _ in range(n)]
        answers = await ask_all(stack.url, keys)
        assert all(status == 200 for status, _ in answers), Counter(answers)
        split = Counter(version for _, version in answers)
        low, high = binomial_bound(n, 0.3)
        assert set(split) == {"v1", "v2"} and low <= split["v2"] <= high, (split, low, high)
        # A session stays on its version: the same keys again give the same answers.
        again = await ask_all(stack.url, keys[:40])
        assert [v for _, v in again] == [v for _, v in answers[:40]]

        # Everything to v2, at run time: within a second every request (also cached sessions) follows.
        opa_data(stack, f"kernelgate/rollouts/{MODEL}", {"weights": {"v1": 0, "v2": 100}}, "PUT")
        changed_at = time.monotonic()
        await asyncio.sleep(1.0)
        after = await ask_all(stack.url, keys[:40] + [f"new-{i}" for i in range(20)])
        assert after == [(200, "v2")] * 60, Counter(after)

        # A client's own version header is stripped by the sidecar: the policy's pick stands.
        opa_data(stack, f"kernelgate/rollouts/{MODEL}", {"weights": {"v1": 1}}, "PUT")
        await asyncio.sleep(1.0)
        spoofed = await ask_all(stack.url, keys[:10], **{MODEL_VERSION_HEADER: "v2"})
        assert spoofed == [(200, "v1")] * 10, spoofed
        assert time.monotonic() - changed_at < 60
        decisions = [json.loads(line) for line in stack.decision_log.read_text().splitlines()]
        picked = Counter(d.get("model_version") for d in decisions if d.get("kind") == "decision")
        assert picked["v2"] >= split["v2"] + 60 and picked["v1"] >= split["v1"] + 10, picked
        assert stack.sidecar_metric("kernelgate_authz_model_version_total", model=MODEL, version="v2") == picked["v2"]
        # Usage reports stay right per version: every allowed decision is settled once, to one token.
        allowed = {d["decision_id"] for d in decisions if d.get("kind") == "decision" and d["outcome"] == "allow"}
        await asyncio.to_thread(wait_for, lambda: allowed <= {s["decision_id"] for s in stack.settlements()}, 30,
                                "every decision settled")
        settled = stack.settlements()
        assert len(settled) == len({s["decision_id"] for s in settled})
        assert all(s["outcome"] == "settled" and s["completion_tokens"] == 1 and s["prompt_tokens"] > 0
                   for s in settled), settled[:3]
    finally:
        stack.stop()


async def test_a_canary_configured_to_fail_is_rolled_back_and_its_weight_set_to_zero(tmp_path: Path) -> None:
    rule = {"window_s": 120, "min_requests": 8, "max_error_rate_increase": 0.2, "max_ttft_ratio": 10}
    stack, replica = stack_with_versions(tmp_path, rollback=rule)
    try:
        bad = await asyncio.to_thread(load_version, replica, MODEL,
                                      {"version": "bad", "random_config": MODEL, "faults": {"error_rate": 1.0}})
        assert bad["state"] == "ready", bad  # its faults are in serving: validation cannot see them
        opa_data(stack, f"kernelgate/rollouts/{MODEL}", {"weights": {"v1": 50, "bad": 50},
                                                         "tenants": {"acme": {"v1": 1, "bad": 1}}}, "PUT")
        answers = await ask_all(stack.url, [f"s-{i}" for i in range(80)], concurrency=2)
        failed = [(status, version) for status, version in answers if status != 200]
        assert failed and all(answer == (500, "bad") for answer in failed), Counter(answers)
        status = await asyncio.to_thread(wait_version, replica, MODEL, "bad", ("rolled_back",), 5)
        assert "error rate" in status["error"] and status["rollbacks"] == 1, status
        # Every failure is one the rule counted before it acted (the canary served nothing after).
        assert len(failed) == status["health"]["errors"] >= rule["min_requests"], (len(failed), status)
        # The sidecar saw the rollback in the replica's load report and wrote weight 0 into OPA's data.
        await asyncio.to_thread(wait_for, lambda: opa_data(stack, f"kernelgate/rollouts/{MODEL}") == {
            "weights": {"v1": 50, "bad": 0}, "tenants": {"acme": {"v1": 1, "bad": 0}}}, 10, "weight 0 in OPA")
        assert stack.sidecar_metric("kernelgate_authz_canary_rollbacks_total", model=MODEL, version="bad") == 1
        await asyncio.sleep(0.5)
        after = await ask_all(stack.url, [f"s-{i}" for i in range(40)])
        assert after == [(200, "v1")] * 40, Counter(after)
        assert "rolled back" in (stack.logs / "sidecar.log").read_text()
    finally:
        stack.stop()
