"""The sidecar's view of replica saturation, from real HTTP load reports (aiohttp servers on loopback)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from common.replicas import LOAD_PATH
from sidecar.config import ReplicasConfig
from sidecar.metrics import SidecarMetrics
from sidecar.replicas import ReplicaState, ReplicaWatcher, saturated


@dataclass
class FakeLoad:
    """A replica's /load document, changed by the test between polls (a real HTTP server serves it)."""

    replica: str
    model: str
    running: int = 0
    waiting: int = 0
    ready: bool = True
    raw: Any = None
    url: str = ""
    runner: web.AppRunner | None = field(default=None, repr=False)

    def document(self) -> Any:
        if self.raw is not None:
            return self.raw
        return {"replica": self.replica, "model": self.model, "ready": self.ready, "running": self.running,
                "waiting": self.waiting, "max_batch_size": 2, "max_queue": 1}


@pytest.fixture
async def replicas() -> AsyncIterator[Callable[..., Any]]:
    started: list[FakeLoad] = []

    async def start(replica: str, model: str) -> FakeLoad:
        fake = FakeLoad(replica, model)

        async def handler(_: web.Request) -> web.Response:
            return web.json_response(fake.document())

        app = web.Application()
        app.router.add_get(LOAD_PATH, handler)
        fake.runner = web.AppRunner(app)
        await fake.runner.setup()
        site = web.TCPSite(fake.runner, "127.0.0.1", 0)
        await site.start()
        fake.url = f"127.0.0.1:{fake.runner.addresses[0][1]}"
        started.append(fake)
        return fake

    yield start
    for fake in started:
        await fake.runner.cleanup()


def watcher_for(targets: list[str]) -> tuple[ReplicaWatcher, CollectorRegistry]:
    registry = CollectorRegistry()
    return ReplicaWatcher(ReplicasConfig(targets=targets), SidecarMetrics(registry)), registry


async def test_model_is_saturated_only_when_no_replica_has_room(replicas) -> None:
    a, b = await replicas("a", "big"), await replicas("b", "big")
    fallback = await replicas("f", "small")
    watcher, registry = watcher_for([a.url, b.url, fallback.url])
    assert watcher.saturated_models() == [], "nothing is known before the first poll"
    async with aiohttp.ClientSession() as session:
        await watcher.poll(session)
        assert watcher.saturated_models() == []
        a.running, a.waiting = 2, 1  # full
        await watcher.poll(session)
        assert watcher.saturated_models() == [], "b still has room"
        b.running, b.waiting = 2, 1
        await watcher.poll(session)
        assert watcher.saturated_models() == ["big"]
        assert registry.get_sample_value("kernelgate_model_saturated", {"model": "big"}) == 1
        assert registry.get_sample_value("kernelgate_replica_requests",
                                         {"replica": "a", "model": "big", "state": "waiting"}) == 1
        assert registry.get_sample_value("kernelgate_replica_saturated", {"replica": "b", "model": "big"}) == 1
        assert registry.get_sample_value("kernelgate_replica_up", {"replica": "f", "model": "small"}) == 1
        b.waiting = 0
        await watcher.poll(session)
        assert watcher.saturated_models() == []
        assert registry.get_sample_value("kernelgate_model_saturated", {"model": "big"}) == 0


async def test_unready_or_vanished_replicas_have_no_room(replicas) -> None:
    a, b = await replicas("a", "big"), await replicas("b", "big")
    watcher, registry = watcher_for([a.url, b.url])
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
        await watcher.poll(session)
        a.ready = False  # loading or draining
        await b.runner.cleanup()  # b's process is gone: it keeps the model it last reported
        await watcher.poll(session)
        assert watcher.saturated_models() == ["big"]
        assert registry.get_sample_value("kernelgate_replica_up", {"replica": "b", "model": "big"}) == 0
        a.ready = True
        await watcher.poll(session)
        assert watcher.saturated_models() == []


async def test_a_bad_report_teaches_nothing(replicas) -> None:
    a = await replicas("a", "big")
    a.raw = {"replica": "a", "model": "big", "running": "many"}
    watcher, _ = watcher_for([a.url, "127.0.0.1:1"])  # and one address where nothing listens
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
        await watcher.poll(session)
    assert watcher.saturated_models() == []
    assert {s.address: s.model for s in watcher.states()} == {a.url: None, "127.0.0.1:1": None}


def test_saturation_rule() -> None:
    from common.replicas import LoadReport

    def state(model: str | None, running: int, ready: bool = True, reachable: bool = True) -> ReplicaState:
        report = LoadReport("r", model or "?", ready, running, 0, 1, 0) if reachable else None
        return ReplicaState("addr", "r", model, report)

    assert saturated([]) == ()
    assert saturated([state("m", 1), state("m", 0)]) == ()
    assert saturated([state("m", 1), state("m", 0, ready=False), state("n", 1)]) == ("m", "n")
    assert saturated([state("m", 0, reachable=False)]) == ("m",)
    assert saturated([state(None, 0, reachable=False)]) == ()


async def test_a_replica_serving_several_models_reports_each_and_its_rollbacks(replicas) -> None:
    a = await replicas("a", "chat")
    a.raw = {"replica": "a", "model": "chat", "ready": True, "running": 2, "waiting": 1, "max_batch_size": 2,
             "max_queue": 1, "rolled_back": ["v2"],
             "models": [{"replica": "a", "model": "embed-ish", "ready": True, "running": 0, "waiting": 0,
                         "max_batch_size": 2, "max_queue": 1, "rolled_back": []}]}
    seen: list[set[tuple[str, str]]] = []

    class Rollbacks:
        async def apply(self, rolled_back) -> None:
            seen.append(set(rolled_back))

    registry = CollectorRegistry()
    watcher = ReplicaWatcher(ReplicasConfig(targets=[a.url]), SidecarMetrics(registry), Rollbacks())
    async with aiohttp.ClientSession() as session:
        await watcher.poll(session)
        assert watcher.saturated_models() == ["chat"], "each model has its own room"
        assert registry.get_sample_value("kernelgate_replica_saturated", {"replica": "a", "model": "chat"}) == 1
        assert registry.get_sample_value("kernelgate_replica_up", {"replica": "a", "model": "embed-ish"}) == 1
        assert seen == [{("chat", "v2")}]
        a.raw["models"][0]["running"], a.raw["models"][0]["waiting"] = 2, 1
        a.raw["rolled_back"] = []
        await watcher.poll(session)
        assert watcher.saturated_models() == ["chat", "embed-ish"]
        assert seen[-1] == set()
        a.raw = {**a.raw, "models": [{"replica": "a", "model": "embed-ish", "running": "many"}]}
        await watcher.poll(session)  # a bad nested report is a bad report: the replica knows nothing now
        assert watcher.saturated_models() == ["chat", "embed-ish"]
        assert [s.report for s in watcher.states()] == [None]
