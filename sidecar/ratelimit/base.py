"""The rate limiter's interface: budgets in, one all-or-nothing verdict out.

As in envoyproxy/ratelimit, what to limit (``descriptors``), how to count (``gcra``) and where
counts live (``memory``, ``redis``) are kept apart; the server only sees ``RateLimiter``.
"""

from __future__ import annotations

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
        """The state to show in headers: the longest wait if denied, else the fullest budget."""
        if not self.states:
            return None
        if not self.allowed:
            return max(self.states, key=lambda s: s.retry_after_s)
        return min(self.states, key=lambda s: (s.remaining / s.limit, s.remaining))


class RateLimiter(Protocol):
    async def charge(self, budgets: Sequence[Budget]) -> RateLimitResult:
        """Consume every budget's cost, or (if any lacks room) none of them."""
        ...

    async def close(self) -> None:
        ...


class BackendUnavailable(Exception):
    """The shared backend (Redis) did not answer in time; no budget was knowingly charged."""


class RateLimitUnavailable(Exception):
    """Budgets cannot be checked and redis_failure_mode is "deny": answer 503."""
