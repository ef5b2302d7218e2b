"""All-or-nothing GCRA over several budgets, shared by the memory and Redis backends.

The Redis Lua script makes the same decision inside Redis; the Redis backend then calls
``settle`` on the debts the script saw, so both backends report states the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sidecar.ratelimit.base import Budget, BudgetState
from sidecar.ratelimit.gcra import GcraDecision, decide


@dataclass(frozen=True)
class Settlement:
    allowed: bool
    states: tuple[BudgetState, ...]
    new_tats: dict[str, float]  # what to store if (and only if) allowed


def settle(now: float, budgets: Sequence[Budget], stored_tat: Callable[[str], float | None]) -> Settlement:
    """Decide every budget against ``stored_tat``; a key named twice is charged twice."""
    pending: dict[str, float] = {}
    decisions: list[tuple[GcraDecision, float | None]] = []
    for b in budgets:
        tat = pending[b.key] if b.key in pending else stored_tat(b.key)
        d = decide(now, tat, b.limit, b.period_s, b.cost)
        decisions.append((d, tat))
        if d.allowed:
            pending[b.key] = d.tat
    allowed = all(d.allowed for d, _ in decisions)
    states = []
    for b, (d, tat) in zip(budgets, decisions):
        if not allowed and d.allowed:
            d = decide(now, tat, b.limit, b.period_s, 0)  # nothing was consumed: show it uncharged
        states.append(BudgetState(b.key, b.kind, b.limit, d.remaining, d.reset_s, d.retry_after_s))
    return Settlement(allowed, tuple(states), pending if allowed else {})
