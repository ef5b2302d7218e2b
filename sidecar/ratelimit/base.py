"""The rate limiter's interface: budgets in, one all-or-nothing verdict out; reservations
settled later to what was really used.

As in envoyproxy/ratelimit, what to limit (``descriptors``), how to count (``gcra``) and where
counts live (``memory``, ``redis``) are kept apart; the server only sees ``RateLimiter``.

A reservation is a charge that remembers itself: ``reserve`` charges every budget and takes a
concurrency slot of every ``Slot`` (all or nothing), ``claim`` removes it exactly once (the
settlement, or ``claim_expired`` when no report came in time) and frees its slots, and
``adjust`` moves a token budget by what the reservation was off. ``sidecar/settlement.py`` is the
one place that strings these together, for every backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Budget:
    """``cost`` units out of ``limit`` per ``period_s`` for ``key``; kind is "requests" or "tokens"."""

    key: str
    limit: int
    period_s: float
    cost: int
    kind: str

    def __post_init__(self) -> None:
        # Checked here, before any backend: a negative cost would refill a shared budget.
        if self.limit <= 0 or self.period_s <= 0 or self.cost < 0:
            raise ValueError("a budget needs limit > 0, period_s > 0 and cost >= 0")


@dataclass(frozen=True)
class BudgetState:
    """A budget after a charge (or, when the request was denied, as it stands uncharged)."""

    key: str
    kind: str
    limit: int
    remaining: int
    reset_s: float  # until the budget is full again
    retry_after_s: float  # 0 when this budget had room for the cost


@dataclass(frozen=True)
class RateLimitResult:
    allowed: bool
    states: tuple[BudgetState, ...]
    backend: str  # "memory", "redis"
    degraded: bool = False  # the configured backend failed and redis_failure_mode answered

    def most_constraining(self) -> BudgetState | None:
        """The state to show in headers: the longest wait if denied, else the fullest budget
        (concurrency slots are not a quota that resets: shown only when they denied)."""
        if not self.states:
            return None
        if not self.allowed:
            return max(self.states, key=lambda s: s.retry_after_s)
        quotas = [s for s in self.states if s.kind != "concurrency"]
        return min(quotas, key=lambda s: (s.remaining / s.limit, s.remaining)) if quotas else None


@dataclass(frozen=True)
class Slot:
    """One of at most ``limit`` requests in flight for ``key``."""

    key: str
    limit: int


@dataclass(frozen=True)
class Reservation:
    """What admission takes, to be settled when the response ends (or expire after ``ttl_s``).

    ``budgets``' token costs are ``reserved_cost``: the prompt and the completion allowance,
    weighted. The rest is what settlement needs to price the real usage.
    """

    reservation_id: str
    tenant: str
    budgets: tuple[Budget, ...]
    slots: tuple[Slot, ...] = ()
    ttl_s: float = 300.0
    reserved_cost: int = 0
    input_weight: float = 1.0
    output_weight: float = 1.0
    prompt_tokens: int = 0
    completion_tokens: int = 0  # the completion allowance reserved


@dataclass(frozen=True)
class Claimed:
    """A reservation taken out of its backend (by settlement or expiry): never claimed twice."""

    reservation_id: str
    tenant: str
    token_budgets: tuple[Budget, ...]  # cost: what was reserved on each
    reserved_cost: int
    input_weight: float
    output_weight: float
    backend: str

    def cost_of(self, prompt_tokens: int, completion_tokens: int) -> int:
        return weighted_cost(prompt_tokens, completion_tokens, self.input_weight, self.output_weight)


def weighted_cost(prompt_tokens: int, completion_tokens: int, input_weight: float, output_weight: float) -> int:
    """Budget units of a request: weighted tokens, rounded up (1.0/1.0 weights: plain tokens)."""
    return math.ceil(prompt_tokens * input_weight + completion_tokens * output_weight - 1e-9)


class RateLimiter(Protocol):
    async def charge(self, budgets: Sequence[Budget]) -> RateLimitResult:
        """Consume every budget's cost, or (if any lacks room) none of them."""
        ...

    async def reserve(self, reservation: Reservation) -> RateLimitResult:
        """``charge`` plus a slot of every ``Slot`` (all or nothing); remembered until claimed."""
        ...

    async def claim(self, reservation_id: str) -> Claimed | None:
        """Remove the reservation and free its slots; None if unknown (settled, expired, never made)."""
        ...

    async def claim_expired(self) -> list[Claimed]:
        """Remove every reservation whose ``ttl_s`` has passed (they stay charged as reserved)."""
        ...

    async def adjust(self, claimed: Claimed, delta: int) -> tuple[BudgetState, ...]:
        """Move the claimed reservation's token budgets by ``delta`` units (negative: refund), in the
        backend that holds them; never denied: the work is done."""
        ...

    async def close(self) -> None:
        ...


class BackendUnavailable(Exception):
    """The shared backend (Redis) did not answer in time; no budget was knowingly charged."""


class RateLimitUnavailable(Exception):
    """Budgets cannot be checked and redis_failure_mode is "deny": answer 503."""
