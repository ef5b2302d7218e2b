"""Decision parsing, the decision cache and the Decider's failure handling (real OPA)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from sidecar.config import OpaConfig
from sidecar.decision import Decider, DecisionCache, DecisionUnavailable, cache_key, parse_result
from sidecar.opa import OpaPolicyClient
from tests import procs
from tests.stack import AuthzStack


def doc(path="/v1/completions", request_id="1", trace="00-a-b-01", tenant="acme"):
    return {"attributes": {"request": {"http": {"id": request_id, "path": path, "method": "POST",
                                                "headers": {"x-request-id": request_id, "traceparent": trace,
                                                            "x-api-key": "k"}}},
                           "source": {"address": {"socketAddress": {"address": "1.2.3.4", "portValue": 1}}}},
            "parsed_path": path.strip("/").split("/"), "identity": {"tenant": tenant}}


def test_parse_result_bool_and_object():
    assert parse_result(True).allowed and parse_result(False).http_status == 403
    d = parse_result({"allowed": False, "http_status": 429, "headers": {"a": "b"}, "body": "x", "reason": "r",
                      "request_headers_to_remove": ["h"]})
    assert (d.allowed, d.http_status, d.headers, d.body, d.reason, d.request_headers_to_remove) == \
        (False, 429, {"a": "b"}, "x", "r", ("h",))
    for bad in ("yes", {"http_status": 200}, {"allowed": True, "http_status": 99999}, [1],
                {"allowed": True, "dynamic_metadata": "x"}, {"allowed": True, "headers": ["h"]}):
        with pytest.raises(ValueError):
            parse_result(bad)


def test_cache_key_ignores_per_request_noise_only():
    ignore = frozenset(OpaConfig().cache_ignore_headers)
    base = cache_key(doc(), ignore)
    assert cache_key(doc(request_id="2", trace="00-c-d-01"), ignore) == base
    other = doc()
    other["attributes"]["source"]["address"]["socketAddress"]["portValue"] = 999
    assert cache_key(other, ignore) == base
    assert cache_key(doc(tenant="globex"), ignore) != base
    assert cache_key(doc(path="/v1/embeddings"), ignore) != base


def test_cache_ttl_lru_and_revision():
    now = [0.0]
    cache = DecisionCache(max_entries=2, ttl_s=5, clock=lambda: now[0])
    d = parse_result(True)
    cache.put("a", d, "")
    cache.put("b", d, "")
    cache.get("a")
    cache.put("c", d, "")
    assert cache.get("b") is None and cache.get("a") == replace(d, source="cache")  # LRU evicted b
    now[0] = 6
    assert cache.get("a") is None  # expired
    cache.put("a", d, "")
    assert cache.set_revision("r2") and len(cache) == 0
    cache.put("x", d, "old-revision")  # an answer computed under an old revision is not kept
    assert cache.get("x") is None


def test_cached_decisions_are_rebuilt_whole_and_leave_the_cyclic_gc_nothing_to_walk():
    cache = DecisionCache(max_entries=10, ttl_s=5)
    d = parse_result({"allowed": True, "headers": {"x-model": "gpt2"}, "response_headers_to_add": {"a": "b"},
                      "request_headers_to_remove": ["x-api-key"], "reason": "fine",
                      "rate_limit": {"requests": 10, "unit": "minute"}}, revision="rev-1")
    cache.revision = "rev-1"
    cache.put("k", d, "rev-1")
    assert cache.get("k") == replace(d, source="cache")
    for _ in range(3):  # each pass untracks the tuples whose items are all untracked: inner first
        gc.collect()
    assert not gc.is_tracked(cache._entries["k"])


@pytest.fixture
def opa(tmp_path: Path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "authz.rego").write_text(
        "package envoy.authz\n\nresult := {\"allowed\": input.identity.tenant == data.kernelgate.tenant}\n")
    (tmp_path / "p" / "data.json").write_text(json.dumps({"kernelgate": {"tenant": "acme"}}))
    proc = procs.start_opa(tmp_path / "logs", tmp_path / "p")
    yield proc, tmp_path / "p"
    proc.stop()


async def test_decider_caches_and_invalidates_on_revision_change(opa):
    proc, policy_dir = opa
    config = OpaConfig(url=f"http://127.0.0.1:{proc.ports['port']}")
    client = OpaPolicyClient(config)
    decider = Decider(config, client, DecisionCache(100, 60))
    await decider.refresh_revision()
    first = await decider.decide(doc())
    assert first.allowed and first.source == "opa"
    assert (await decider.decide(doc(request_id="9"))).source == "cache"
    (policy_dir / "data.json").write_text(json.dumps({"kernelgate": {"tenant": "globex"}}))
    for _ in range(50):
        if await decider.refresh_revision():
            break
        await asyncio.sleep(0.1)
    fresh = await decider.decide(doc())
    assert fresh.source == "opa" and not fresh.allowed
    await client.close()


async def test_decider_raises_unavailable_when_opa_is_slow_or_down(opa):
    proc, _ = opa
    config = OpaConfig(url=f"http://127.0.0.1:{proc.ports['port']}", timeout_s=0.2)
    client = OpaPolicyClient(config)
    decider = Decider(config, client, DecisionCache(0, 1))
    assert (await decider.decide(doc())).allowed
    os.kill(proc.popen.pid, signal.SIGSTOP)  # a real OPA that stops answering
    try:
        with pytest.raises(DecisionUnavailable, match="within 0.2s"):
            await decider.decide(doc())
    finally:
        os.kill(proc.popen.pid, signal.SIGCONT)
    assert (await decider.decide(doc())).allowed  # resumes, same client, no restart
    proc.kill()
    with pytest.raises(DecisionUnavailable, match="OPA query failed"):
        await decider.decide(doc())
    await client.close()


async def test_undefined_policy_path_is_unavailable_not_allow(opa):
    proc, _ = opa
    config = OpaConfig(url=f"http://127.0.0.1:{proc.ports['port']}", policy_path="envoy/authz/nope")
    client = OpaPolicyClient(config)
    with pytest.raises(DecisionUnavailable, match="undefined"):
        await Decider(config, client, DecisionCache(10, 1)).decide(doc())
    await client.close()


class _CountingClient:
    in_process = False

    def __init__(self) -> None:
        self.documents: list[dict] = []

    async def evaluate(self, document):
        self.documents.append(document)
        return True

    async def revision(self) -> str:
        return "r1"


async def test_warm_up_evaluates_once_and_caches_nothing():
    client = _CountingClient()
    decider = Decider(OpaConfig(), client, DecisionCache(8, 60))
    await decider.warm_up()
    assert client.documents == [{}]
    decision = await decider.decide(doc())
    assert decision.source != "cache" and len(client.documents) == 2  # the first check still asks the policy


async def test_a_fresh_sidecar_has_evaluated_the_policy_before_its_port_opens(tmp_path: Path):
    """start() warms the policy client before listening: OPA has answered a policy query by the time
    a check can arrive (on a loaded machine a fresh worker's first query ran past opa.timeout_s and
    its first check was refused)."""
    stack = AuthzStack(tmp_path)
    try:
        stack.start_opa()
        stack.start_sidecar()  # returns once the port accepts connections
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.opa_port}/metrics", timeout=5) as reply:
            lines = reply.read().decode().splitlines()
        queries = [line for line in lines if line.startswith("http_request_duration_seconds_count")
                   and 'handler="v1/data"' in line and 'method="post"' in line]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in queries) >= 1, queries
    finally:
        stack.stop()
