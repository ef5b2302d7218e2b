"""Three real inference servers (CPU, tiny model) behind a real Envoy, sidecar and OPA.

Least-request balancing spreads requests by load; a replica killed under open-loop load loses
no request that had not started (Envoy retries it elsewhere), stops getting requests within the
failure-detection window, and rejoins once it is back; a slow replica gets less traffic.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.replica_stack import Replica, ReplicaStack, open_loop, send, wait_for

BODY = {"model": "tiny-gpt2", "prompt": "Hello", "max_tokens": 24, "ignore_eos": True, "temperature": 0}
# After a kill, Envoy stops picking the replica once its outlier detection (2 failures in a row)
# or its health check (2 failed checks 0.25 s apart) has fired; 2 s bounds both with room for a
# busy CI machine.
DETECTION_WINDOW_S = 2.0


def make_stack(workdir: Path, replicas: list[Replica]) -> ReplicaStack:
    workdir.mkdir()
    return ReplicaStack(workdir, replicas=replicas).start()


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Iterator[ReplicaStack]:
    stack = make_stack(tmp_path_factory.mktemp("replicas") / "three", [Replica(f"r{i}") for i in range(3)])
    yield stack
    stack.stop()


async def closed_loop(url: str, body: dict, concurrency: int, total: int) -> list[str]:
    """``total`` requests from ``concurrency`` clients, each sending as soon as its last answered."""
    served: list[str] = []
    queue = iter(range(total))
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            for _ in queue:
                status, headers, text = await send(session, url, body)
                assert status == 200, text
                served.append(headers["x-kernelgate-replica"])

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return served


async def test_requests_spread_across_replicas_and_name_the_replica(three: ReplicaStack) -> None:
    served = await closed_loop(three.url, BODY, concurrency=6, total=36)
    counts = collections.Counter(served)
    assert set(counts) == {"r0", "r1", "r2"}, counts
    assert max(counts.values()) <= 0.6 * len(served), f"least-request should spread equal replicas: {counts}"
    # The access log names the upstream host of each request, and it is the replica that answered.
    address = {r.name: r.address for r in three.replicas}

    def entries() -> list[dict]:
        return [e for e in three.access_log_entries() if e["path"] == "/v1/completions" and e["status"] == 200]

    wait_for(lambda: len(entries()) >= len(served), 10, "Envoy to flush its access log")
    assert all(e["upstream_host"] == address[e["replica"]] and e["upstream_cluster"] == "inference"
               for e in entries()), entries()[:3]
    # The sidecar's metrics show each replica's load as it last polled it.
    for name in address:
        wait_for(lambda n=name: three.sidecar_metric("kernelgate_replica_up", model="tiny-gpt2", replica=n) == 1,
                 5, f"the sidecar to report {name} up")
        assert three.sidecar_metric("kernelgate_replica_requests", model="tiny-gpt2", replica=name,
                                    state="waiting") is not None


async def test_killed_replica_loses_no_unstarted_request_stops_getting_traffic_and_rejoins(three: ReplicaStack) -> None:
    victim = three.replicas[2]
    kill_at = 2.0

    async def kill() -> None:
        await asyncio.sleep(kill_at)
        await asyncio.to_thread(three.kill, victim)

    outcomes, _ = await asyncio.gather(open_loop(three.url, BODY, rate=20, duration_s=6.0), kill())
    kinds = collections.Counter(o.kind for o in outcomes)
    assert len(outcomes) == 120
    assert kinds["failed_not_started"] == 0, [o.detail for o in outcomes if o.kind == "failed_not_started"]
    # Only requests the victim held when it died may fail: at most what 20 req/s keeps in flight there.
    assert kinds["failed_started"] <= 10, [o.detail for o in outcomes if o.kind == "failed_started"]
    assert kinds["ok"] == len(outcomes) - kinds["failed_started"]
    # A request that met the dead replica first was retried on another one, and succeeded.
    assert all(o.kind == "ok" for o in outcomes if o.attempts > 1), kinds
    assert all(o.replica != victim.name for o in outcomes if o.sent_at > kill_at + 0.5 and o.kind == "ok")
    # Within the detection window Envoy stops choosing it: later requests need no retry.
    late = [o for o in outcomes if o.sent_at > kill_at + DETECTION_WINDOW_S]
    assert late and all(o.attempts == 1 for o in late), [(o.sent_at, o.attempts) for o in late if o.attempts > 1]
    assert not three.healthy(victim.address)

    # Back on its port: health checks let it in again and it serves its share.
    await asyncio.to_thread(three.start_replica, victim)
    await asyncio.to_thread(three.wait_healthy, {victim.address})
    served = await closed_loop(three.url, BODY, concurrency=6, total=30)
    assert victim.name in served, collections.Counter(served)


async def test_connect_failures_are_retried_elsewhere_until_outlier_detection_ejects_the_replica(
        tmp_path_factory) -> None:
    """Health checks far apart: only retries and outlier detection stand between clients and a dead replica."""
    workdir = tmp_path_factory.mktemp("replicas") / "outlier"
    workdir.mkdir()
    stack = ReplicaStack(workdir, replicas=[Replica("a0"), Replica("a1")],
                         envoy_overrides={"upstream": {"health_check_interval_s": 60.0,
                                                       "outlier_base_ejection_s": 60.0}})
    try:
        stack.start()
        stack.kill(stack.replicas[1])
        async with aiohttp.ClientSession() as session:
            answers = [await send(session, stack.url, BODY) for _ in range(20)]
        assert [status for status, _, _ in answers] == [200] * 20, answers
        assert {headers["x-kernelgate-replica"] for _, headers, _ in answers} == {"a0"}
        attempts = [int(headers["x-envoy-attempt-count"]) for _, headers, _ in answers]
        # Each request that picked the dead replica was retried on the live one; after two such
        # connect failures in a row (outlier_consecutive_5xx) Envoy ejects it and stops trying.
        assert 1 <= sum(a > 1 for a in attempts) <= 2, attempts
        assert "failed_outlier_check" in stack.hosts()[stack.replicas[1].address]["health_flags"]
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def one_slow(tmp_path_factory) -> Iterator[ReplicaStack]:
    replicas = [Replica("fast0"), Replica("fast1"), Replica("slow", random_config="small-gpt2")]
    stack = make_stack(tmp_path_factory.mktemp("replicas") / "slow", replicas)
    yield stack
    stack.stop()


async def test_slow_replica_gets_less_traffic(one_slow: ReplicaStack) -> None:
    served = collections.Counter(await closed_loop(one_slow.url, {**BODY, "max_tokens": 48}, concurrency=6,
                                                   total=96))
    # Against the fast replicas' mean share: least_request picks the less busy of two random
    # replicas, so two identical fast ones split their part unevenly by chance (24 and 12 of 48 in
    # one CI run, where the slow one's 12 tied the smaller and failed a comparison with the min).
    assert served["slow"] < (served["fast0"] + served["fast1"]) / 2, served
