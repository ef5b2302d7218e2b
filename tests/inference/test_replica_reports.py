"""What a replica tells the gateway: its load (/load), its name, which refusals never started, which model served."""

from __future__ import annotations

import asyncio

import aiohttp

from common.replicas import LOAD_PATH, NOT_STARTED_HEADER, REPLICA_HEADER, LoadReport
from inference.config import BatchingConfig
from tests.inference.helpers import Gate, SlowSteps, make_engine, started_engine, tiny_config, wait_until

MODEL = "tiny-gpt2"


async def load(session: aiohttp.ClientSession, url: str) -> LoadReport:
    async with session.get(url + LOAD_PATH) as resp:
        assert resp.status == 200
        assert resp.headers[REPLICA_HEADER]
        data = await resp.json()
    report = LoadReport.from_json(data)
    assert data["saturated"] == report.saturated and data["capacity"] == report.capacity
    return report


async def test_load_report_counts_running_and_waiting_until_saturated(serve) -> None:
    config = tiny_config(batching=BatchingConfig(max_batch_size=1, max_wait_ms=0.0, max_queue=1), replica_id="r7")
    engine = started_engine(config, observer=SlowSteps(0.02))
    try:
        served = await serve(config, engine=engine)
        url = f"{served.url}/v1/completions"
        body = {"model": MODEL, "prompt": "busy", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
        async with aiohttp.ClientSession() as s:
            idle = await load(s, served.url)
            assert (idle.replica, idle.model, idle.ready, idle.running, idle.waiting) == ("r7", MODEL, True, 0, 0)
            assert idle.capacity == 2 and not idle.saturated and idle.has_room
            first = asyncio.create_task(s.post(url, json=body))
            await wait_until(lambda: engine.stats().running == 1)
            second = asyncio.create_task(s.post(url, json=body))
            await wait_until(lambda: engine.stats().waiting == 1)
            full = await load(s, served.url)
            assert (full.running, full.waiting, full.saturated, full.has_room) == (1, 1, True, False)
            # The refusal a full replica answers never started: Envoy may retry it elsewhere.
            async with s.post(url, json=body) as resp:
                assert resp.status == 429 and resp.headers[NOT_STARTED_HEADER] == "1"
                assert resp.headers[REPLICA_HEADER] == "r7"
            for task in (first, second):
                async with await task as resp:
                    assert resp.status == 200 and NOT_STARTED_HEADER not in resp.headers
                    assert resp.headers[REPLICA_HEADER] == "r7"
    finally:
        engine.shutdown(10)


async def test_not_ready_and_draining_refusals_are_marked_not_started(serve) -> None:
    gate = Gate()
    config = tiny_config()
    engine = make_engine(config, load=gate)
    served = await serve(config, engine=engine)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    try:
        async with aiohttp.ClientSession() as s:
            loading = await load(s, served.url)
            assert not loading.ready and not loading.has_room
            async with s.post(f"{served.url}/v1/completions", json=body) as resp:
                assert resp.status == 503 and resp.headers[NOT_STARTED_HEADER] == "1"
            gate.open()
            await wait_until(lambda: engine.ready, timeout=60)
            assert (await load(s, served.url)).ready
            served.state.draining = True
            async with s.post(f"{served.url}/v1/completions", json=body) as resp:
                assert resp.status == 503 and resp.headers[NOT_STARTED_HEADER] == "1"
                assert (await resp.json())["error"]["code"] == "shutting_down"
            assert not (await load(s, served.url)).ready, "a draining replica has no room"
            # A request that fails on its own merits is no refusal: nothing to retry.
            served.state.draining = False
            async with s.post(f"{served.url}/v1/completions", json={**body, "max_tokens": -1}) as resp:
                assert resp.status == 400 and NOT_STARTED_HEADER not in resp.headers
    finally:
        engine.shutdown(10)


async def test_gateway_routing_to_this_model_overrides_the_body_and_the_answer_names_it(serve, shared_engine) -> None:
    served = await serve(engine=shared_engine)
    url = f"{served.url}/v1/completions"
    async with aiohttp.ClientSession() as s:
        # Degraded by the policy: the body asked for another model, the gateway routed it here.
        async with s.post(url, json={"model": "gpt2-medium", "prompt": "hi", "max_tokens": 2},
                          headers={"x-kernelgate-model": MODEL}) as resp:
            assert resp.status == 200
            assert (await resp.json())["model"] == MODEL
        # Without that routing, another model's name is still unknown here.
        async with s.post(url, json={"model": "gpt2-medium", "prompt": "hi", "max_tokens": 2}) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
        async with s.post(url, json={"model": "gpt2-medium", "prompt": "hi", "max_tokens": 2},
                          headers={"x-kernelgate-model": "opt-1.3b"}) as resp:
            assert resp.status == 404


def test_load_report_parser_names_the_bad_field() -> None:
    good = {"replica": "r", "model": "m", "ready": True, "running": 0, "waiting": 0, "max_batch_size": 1,
            "max_queue": 0}
    assert LoadReport.from_json(good).capacity == 1
    for field, value in (("running", -1), ("ready", "yes"), ("waiting", True), ("model", None)):
        try:
            LoadReport.from_json({**good, field: value})
        except ValueError as exc:
            assert f"'{field}'" in str(exc)
        else:
            raise AssertionError(f"{field}={value!r} was accepted")
    try:
        LoadReport.from_json([1])
    except ValueError as exc:
        assert "object" in str(exc)
    else:
        raise AssertionError("a list was accepted")
