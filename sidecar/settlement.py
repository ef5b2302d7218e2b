"""Settlement: a reservation made at admission is settled to what the GPU really did.

In: the inference server's usage report for a decision id ({prompt_tokens, completion_tokens,
ending}), sent when the response ends, however it ends; or nothing, in which case the
reservation expires after ``ratelimit.reservation_ttl_s``. Out: the budgets moved by the
difference (refund of the unused part, charge of an overrun), concurrency slots freed, one
decision-log line and the token counters of the tenant.

This is the one settlement path for every backend: ``claim`` (exactly once: a repeated or late
report finds nothing and changes nothing), then ``adjust`` by ``actual - reserved``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any

from sidecar.decision_log import DecisionLogger, SettlementRecord
from sidecar.metrics import SidecarMetrics
from sidecar.ratelimit import Claimed, RateLimiter

log = logging.getLogger("kernelgate.settlement")

DECISION_ID = re.compile(r"^[0-9a-f]{32}$")
ENDINGS = frozenset({"stop", "length", "disconnect", "error", "timeout", "rejected", "cut"})


class ReportError(ValueError):
    """A usage report that is not one (the HTTP layer answers 400 with this message)."""


@dataclass(frozen=True)
class UsageReport:
    decision_id: str
    prompt_tokens: int  # prefilled
    completion_tokens: int  # generated
    ending: str = "stop"

    @classmethod
    def parse(cls, data: Any) -> UsageReport:
        if not isinstance(data, dict):
            raise ReportError("a usage report is a JSON object")
        decision_id = data.get("decision_id")
        if not isinstance(decision_id, str) or not DECISION_ID.match(decision_id):
            raise ReportError("'decision_id' must be the 32 hex digits of x-kernelgate-decision-id")
        counts = []
        for name in ("prompt_tokens", "completion_tokens"):
            value = data.get(name)  # a protobuf Struct carries numbers as doubles
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ReportError(f"'{name}' must be an integer >= 0")
            counts.append(value)
        ending = data.get("ending", "stop")
        if ending not in ENDINGS:
            raise ReportError(f"'ending' must be one of {', '.join(sorted(ENDINGS))}")
        return cls(decision_id, counts[0], counts[1], ending)


@dataclass(frozen=True)
class Settled:
    settled: bool  # False: unknown id (already settled, expired, never reserved)
    charged: int = 0
    refunded: int = 0
    reserved: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"settled": self.settled, "charged": self.charged, "refunded": self.refunded,
                "reserved": self.reserved}


class Settlement:
    def __init__(self, limiter: RateLimiter, metrics: SidecarMetrics, decision_log: DecisionLogger,
                 sweep_interval_s: float = 1.0) -> None:
        self._limiter = limiter
        self._metrics = metrics
        self._log = decision_log
        self._sweep_interval_s = sweep_interval_s

    async def settle(self, report: UsageReport) -> Settled:
        claimed = await self._limiter.claim(report.decision_id)
        if claimed is None:
            self._metrics.settlements.labels("unknown").inc()
            return Settled(False)
        actual = claimed.cost_of(report.prompt_tokens, report.completion_tokens) if claimed.token_budgets else 0
        delta = actual - claimed.reserved_cost
        if delta and claimed.token_budgets:
            await self._limiter.adjust(claimed, delta)
        refunded = max(0, -delta)
        self._count(claimed, "settled", actual, refunded)
        self._log.write(SettlementRecord(
            decision_id=report.decision_id, tenant=claimed.tenant, outcome="settled", ending=report.ending,
            prompt_tokens=report.prompt_tokens, completion_tokens=report.completion_tokens,
            reserved=claimed.reserved_cost, charged=actual, refunded=refunded, backend=claimed.backend))
        return Settled(True, actual, refunded, claimed.reserved_cost)

    async def expire(self) -> int:
        """Settle every reservation past its expiry at its reserved amount; returns how many."""
        expired = await self._limiter.claim_expired()
        for claimed in expired:
            self._count(claimed, "expired", claimed.reserved_cost, 0)
            self._log.write(SettlementRecord(
                decision_id=claimed.reservation_id, tenant=claimed.tenant, outcome="expired", ending="unreported",
                prompt_tokens=None, completion_tokens=None, reserved=claimed.reserved_cost,
                charged=claimed.reserved_cost, refunded=0, backend=claimed.backend))
        if expired:
            log.warning("%d reservation(s) expired unreported; charged as reserved", len(expired))
        return len(expired)

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep expired reservations until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.expire()
            except Exception:  # noqa: BLE001 - a failed sweep is retried by the next one
                log.exception("expiry sweep failed")
            try:
                await asyncio.wait_for(stop.wait(), self._sweep_interval_s)
            except TimeoutError:
                pass

    def _count(self, claimed: Claimed, outcome: str, charged: int, refunded: int) -> None:
        self._metrics.settlements.labels(outcome).inc()
        if claimed.token_budgets:
            tenant = claimed.tenant or "none"
            self._metrics.tokens.labels(tenant, "charged").inc(charged)
            self._metrics.tokens.labels(tenant, "refunded").inc(refunded)
