"""Saturation of the inference replicas, learnt by polling each one's load report.

In: ``ReplicasConfig`` (targets to poll), each replica's ``GET /load`` document
(``common.replicas.LoadReport``). Out: :meth:`ReplicaWatcher.saturated_models`, the sorted
models no replica has room for, which the authorizer puts in the policy input
(``input.kernelgate.saturated_models``), per-replica load gauges, and the canaries the
replicas rolled back, handed to ``sidecar.rollouts.RollbackWriter`` at every poll.

A model is saturated when replicas of it are known and none is reachable, ready and below
its batch + queue capacity. A replica that stops answering keeps the model it last
reported, so a model whose every replica is down counts as saturated too. Nothing is
known before the first poll: then no model is saturated (the servers' own 429 still holds).
This is the sidecar's view only; it does not use or touch the token-settlement channel.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from common.replicas import LOAD_PATH, LoadReport
from sidecar.config import ReplicasConfig
from sidecar.metrics import SidecarMetrics

log = logging.getLogger("kernelgate.authz.replicas")


@dataclass(frozen=True)
class ReplicaState:
    """What one poll of one replica address found."""

    address: str
    name: str  # the replica id it last reported, else its address
    model: str | None  # the first model it last reported
    report: LoadReport | None
    others: tuple[str, ...] = ()  # the other models it last reported (several models per server)

    @property
    def models(self) -> tuple[str, ...]:
        return () if self.model is None else (self.model, *self.others)

    @property
    def has_room(self) -> bool:
        return self.report is not None and self.report.has_room

    def room_for(self, model: str) -> bool:
        if self.report is None:
            return False
        return any(r.model == model and r.has_room for r in self.report.per_model())


def saturated(states: list[ReplicaState]) -> tuple[str, ...]:
    """Models with at least one known replica and no replica with room, sorted."""
    models: dict[str, bool] = {}
    for state in states:
        for model in state.models:
            models[model] = models.get(model, False) or state.room_for(model)
    return tuple(sorted(model for model, room in models.items() if not room))


class Rollbacks(Protocol):
    """Where rolled-back canaries go (``sidecar.rollouts.RollbackWriter``)."""

    async def apply(self, rolled_back: Iterable[tuple[str, str]]) -> None: ...


def rolled_back(states: list[ReplicaState]) -> set[tuple[str, str]]:
    """``(model, version)`` of every canary a reachable replica reports as rolled back."""
    return {(report.model, version) for state in states if state.report is not None
            for report in state.report.per_model() for version in report.rolled_back}


class ReplicaWatcher:
    """Polls every target's load report; :meth:`saturated_models` reads the latest result."""

    def __init__(self, config: ReplicasConfig, metrics: SidecarMetrics, rollbacks: Rollbacks | None = None) -> None:
        self._config = config
        self._metrics = metrics
        self._rollbacks = rollbacks
        self._states: dict[str, ReplicaState] = {}
        self._saturated: tuple[str, ...] = ()
        self._addresses: list[str] = []
        self._resolved_at = float("-inf")

    @property
    def enabled(self) -> bool:
        return bool(self._config.targets)

    def saturated_models(self) -> list[str]:
        return list(self._saturated)

    def states(self) -> list[ReplicaState]:
        return list(self._states.values())

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set."""
        if not self.enabled:
            return
        timeout = aiohttp.ClientTimeout(total=self._config.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stop.is_set():
                try:
                    await self.poll(session)
                except Exception:  # noqa: BLE001 - a bad round must not end polling
                    log.exception("polling the replicas' load failed")
                try:
                    await asyncio.wait_for(stop.wait(), self._config.poll_interval_s)
                except TimeoutError:
                    pass

    async def poll(self, session: aiohttp.ClientSession) -> None:
        """One round: resolve targets when due, fetch every report, recompute saturation."""
        now = time.monotonic()
        if now - self._resolved_at >= self._config.resolve_interval_s or not self._addresses:
            self._addresses = await _resolve(self._config.targets or [])
            self._resolved_at = now
        states = await asyncio.gather(*(self._poll_one(session, address) for address in self._addresses))
        gone = set(self._states) - set(self._addresses)
        for address in gone:
            self._forget(self._states[address])
        self._states = {state.address: state for state in states}
        models = saturated(list(states))
        if models != self._saturated:
            log.warning("saturated models: %s", ", ".join(models) or "none")
        for model in set(self._saturated) | set(models):
            self._metrics.saturated_models.labels(model).set(1 if model in models else 0)
        self._saturated = models
        if self._rollbacks is not None:
            await self._rollbacks.apply(rolled_back(list(states)))

    async def _poll_one(self, session: aiohttp.ClientSession, address: str) -> ReplicaState:
        previous = self._states.get(address)
        model, name, others = (previous.model, previous.name, previous.others) if previous else (None, address, ())
        try:
            async with session.get(f"http://{address}{LOAD_PATH}") as response:
                report = LoadReport.from_json(await response.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            if previous is None or previous.report is not None:
                log.warning("replica %s: no load report (%s)", address, exc or type(exc).__name__)
            state = ReplicaState(address, name, model, None, others)
        else:
            served = tuple(r.model for r in report.per_model())
            if previous is not None and previous.model is not None and (previous.name, previous.models) != (report.replica, served):
                self._forget(previous)
            state = ReplicaState(address, report.replica, report.model, report, served[1:])
        self._export(state)
        return state

    def _export(self, state: ReplicaState) -> None:
        reports = {r.model: r for r in state.report.per_model()} if state.report is not None else {}
        replica, m = state.name, self._metrics
        for model in state.models:
            report = reports.get(model)
            m.replica_up.labels(replica, model).set(1 if report is not None and report.ready else 0)
            m.replica_saturated.labels(replica, model).set(1 if report is not None and report.saturated else 0)
            m.replica_requests.labels(replica, model, "running").set(report.running if report else 0)
            m.replica_requests.labels(replica, model, "waiting").set(report.waiting if report else 0)

    def _forget(self, state: ReplicaState) -> None:
        replica, m = state.name, self._metrics
        for model in state.models:
            for gauge in (m.replica_up, m.replica_saturated):
                gauge.remove(replica, model)
            for kind in ("running", "waiting"):
                m.replica_requests.remove(replica, model, kind)


async def _resolve(targets: list[str]) -> list[str]:
    """Every address of every target (host:port); a name that does not resolve now is skipped."""
    loop = asyncio.get_running_loop()
    addresses: list[str] = []
    for target in targets:
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        try:
            infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("replica target %s does not resolve: %s", target, exc)
            continue
        for family, _, _, _, sockaddr in infos:
            address = f"[{sockaddr[0]}]:{sockaddr[1]}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{sockaddr[1]}"
            if address not in addresses:
                addresses.append(address)
    return addresses
