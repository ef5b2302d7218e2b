"""Canary versions on the real server (CPU, tiny random-weight models): a request naming a validated
version is served by it, and a canary worse than the stable version (more errors, slower first
token) is rolled back automatically: status, /load, metrics. The policy's pick and the sidecar's
write to OPA are tested through the whole stack in tests/e2e/test_canary.py."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp

from common.models import MODEL_VERSION_HEADER
from inference.config import RollbackConfig, ValidationConfig
from inference.tracing import Tracing
from otel import names
from tests.inference.test_models import auth, served, two_models, wait_state  # noqa: F401 - served is a fixture

ROLLBACK = RollbackConfig(window_s=120.0, min_requests=6, max_error_rate_increase=0.2, max_ttft_ratio=3.0)


def config():
    return replace(two_models(), rollback=ROLLBACK, validation=ValidationConfig(shadow_samples=0))


async def complete(s: aiohttp.ClientSession, url: str, version: str | None, prompt: str = "Hello"):
    headers = {MODEL_VERSION_HEADER: version} if version is not None else {}
    async with s.post(f"{url}/v1/completions", headers=headers,
                      json={"model": "gpt", "prompt": prompt, "max_tokens": 2, "temperature": 0}) as r:
        return r.status, r.headers.get(MODEL_VERSION_HEADER), await r.json()


async def load(s: aiohttp.ClientSession, admin: str, version: str, **faults: float) -> dict:
    async with s.post(f"{admin}/admin/models/gpt/versions", headers=auth(),
                      json={"version": version, "random_config": "tiny-gpt2", "seed": 0, "faults": faults}) as r:
        assert r.status == 202, await r.text()
    ready = await wait_state(s, admin, "gpt", version, ("ready", "failed"))
    assert ready["state"] == "ready", ready
    return ready


async def load_report(s: aiohttp.ClientSession, url: str) -> dict:
    async with s.get(f"{url}/load") as r:
        report = await r.json()
    return next(m for m in [report, *report["models"]] if m["model"] == "gpt")


async def test_a_request_naming_a_validated_version_is_served_by_it(served, sdk) -> None:
    provider, exporter = sdk
    url, admin = await served(config(), tracing=Tracing(provider.get_tracer(names.INFERENCE_TRACER)))
    async with aiohttp.ClientSession() as s:
        await load(s, admin, "v2")
        answers = await asyncio.gather(complete(s, url, "v2"), complete(s, url, None), complete(s, url, "v1"),
                                       complete(s, url, "nope"))
        assert [(status, version) for status, version, _ in answers] == [(200, "v2"), (200, "v1"), (200, "v1"),
                                                                         (200, "v1")]
        # Both versions take new requests: the model's capacity on /load is both engines' slots.
        report = await load_report(s, url)
        assert report["max_batch_size"] == 2 * 4 and report["rolled_back"] == []
        status = await wait_state(s, admin, "gpt", "v2", ("ready",))
        assert status["served"] == 1 and status["health"]["requests"] == 1
    # The request span names the version that answered.
    versions = sorted(span.attributes[names.MODEL_VERSION] for span in exporter.get_finished_spans()
                      if span.name == names.http_server_span_name("POST", "/v1/completions"))
    assert versions == ["v1", "v1", "v1", "v2"], versions


async def test_a_canary_that_fails_is_rolled_back(served) -> None:
    url, admin = await served(config())
    async with aiohttp.ClientSession() as s:
        await load(s, admin, "bad", error_rate=1.0)  # validation passes: the faults are in serving
        stable = await asyncio.gather(*(complete(s, url, None, f"stable {i}") for i in range(ROLLBACK.min_requests)))
        assert all(status == 200 for status, _, _ in stable)
        canary = []
        for i in range(ROLLBACK.min_requests):
            canary.append(await complete(s, url, "bad", f"canary {i}"))
        assert all((status, version) == (500, "bad") for status, version, _ in canary), canary
        assert canary[0][2]["error"]["code"] == "injected_fault"
        bad = await wait_state(s, admin, "gpt", "bad", ("rolled_back",), timeout=5)
        assert "error rate 100.0%" in bad["error"] and bad["rollbacks"] == 1, bad
        assert bad["health"]["errors"] == ROLLBACK.min_requests
        # From now on a request that names it is served by the active version.
        status, version, _ = await complete(s, url, "bad")
        assert (status, version) == (200, "v1")
        assert (await load_report(s, url))["rolled_back"] == ["bad"]
        async with s.get(f"{url}/metrics") as r:
            metrics = await r.text()
        assert 'kernelgate_inference_model_version_rollbacks_total{model="gpt",version="bad"} 1.0' in metrics
        assert 'kernelgate_inference_model_version_state{model="gpt",state="rolled_back",version="bad"} 1.0' in metrics
        assert 'kernelgate_inference_model_version_error_rate{model="gpt",version="bad"} 1.0' in metrics
        # A rolled-back version cannot be activated; it can be unloaded.
        async with s.post(f"{admin}/admin/models/gpt/versions/bad/activate", headers=auth()) as r:
            assert r.status == 409
        async with s.delete(f"{admin}/admin/models/gpt/versions/bad", headers=auth()) as r:
            assert r.status == 200
        await wait_state(s, admin, "gpt", "bad", ("unloaded",))
        assert (await load_report(s, url))["rolled_back"] == []


async def test_a_canary_with_a_slow_first_token_is_rolled_back(served) -> None:
    url, admin = await served(config())
    async with aiohttp.ClientSession() as s:
        await load(s, admin, "slow", first_token_delay_ms=3000.0)
        for i in range(ROLLBACK.min_requests):  # one at a time: the stable median is an unqueued one
            assert (await complete(s, url, None, f"stable {i}"))[0] == 200
        canary = await asyncio.gather(*(complete(s, url, "slow", f"canary {i}") for i in range(ROLLBACK.min_requests)))
        assert all((status, version) == (200, "slow") for status, version, _ in canary)
        slow = await wait_state(s, admin, "gpt", "slow", ("rolled_back",), timeout=5)
        assert "time to first token" in slow["error"] and "max_ttft_ratio" in slow["error"], slow
        assert slow["health"]["ttft_p50_ms"] >= 3000
        assert (await complete(s, url, "slow"))[1] == "v1"


async def test_a_healthy_canary_stays(served) -> None:
    url, admin = await served(config())
    async with aiohttp.ClientSession() as s:
        await load(s, admin, "v2")
        for i in range(2 * ROLLBACK.min_requests):
            version = None if i % 2 else "v2"
            status, answered, _ = await complete(s, url, version, f"both {i}")
            assert (status, answered) == (200, version or "v1")
        v2 = await wait_state(s, admin, "gpt", "v2", ("ready", "rolled_back"))
        assert v2["state"] == "ready" and v2["rollbacks"] == 0 and v2["health"]["requests"] == ROLLBACK.min_requests
