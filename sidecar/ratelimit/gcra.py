"""The generic cell rate algorithm (GCRA) with a cost per request; pure functions of time.

A budget of ``limit`` per ``period_s`` emits one unit every ``T = period_s / limit``. The state
is one number, the theoretical arrival time (TAT): the moment the budget would be full again.
Its distance ahead of now is the budget's debt. A charge of ``cost`` adds ``cost * T`` of debt,
allowed while the debt stays within the burst tolerance ``period_s``, so a full ``limit`` may be
spent at once and then refills smoothly (no fixed-window edge where 2x passes).

A cost larger than the limit can never fit. It is denied with ``retry_after_s = period_s``, the
time a drained budget takes to refill completely; ``impossible`` tells callers that waiting will
not help (the policy should reject such requests, e.g. max_tokens above the tenant's budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Float rounding slack, in units of T: 3 charges of 1/3 must fit exactly into 1.
SLACK_UNITS = 1e-6


@dataclass(frozen=True)
class GcraDecision:
    allowed: bool
    tat: float  # TAT to store if the charge is committed (the current one when denied)
    remaining: int  # units left: after the charge if allowed, as now if denied
    reset_s: float  # until full again: after the charge if allowed, as now if denied
    retry_after_s: float  # 0 when allowed
    impossible: bool = False  # cost > limit: no wait makes it fit


def decide(now: float, tat: float | None, limit: int, period_s: float, cost: int) -> GcraDecision:
    """Whether ``cost`` fits at ``now`` given the stored ``tat`` (None: never used)."""
    if limit <= 0 or period_s <= 0 or cost < 0:
        raise ValueError("limit and period_s must be positive and cost not negative")
    interval = period_s / limit
    debt = max(tat - now, 0.0) if tat is not None else 0.0
    new_debt = debt + cost * interval
    if cost <= limit and new_debt <= period_s + SLACK_UNITS * interval:
        return GcraDecision(True, now + new_debt, _units_left(period_s, new_debt, interval, limit),
                            new_debt, 0.0)
    remaining = _units_left(period_s, debt, interval, limit)
    if cost > limit:
        return GcraDecision(False, now + debt, remaining, debt, period_s, impossible=True)
    return GcraDecision(False, now + debt, remaining, debt, new_debt - period_s)


def _units_left(period_s: float, debt: float, interval: float, limit: int) -> int:
    return max(0, min(limit, math.floor((period_s - debt) / interval + SLACK_UNITS)))


def adjust(now: float, tat: float | None, limit: int, period_s: float, delta: int) -> float:
    """The TAT after moving a budget by ``delta`` units already spent (settlement).

    A positive delta adds debt with no check (the tokens were generated; the budget may go past
    its burst, and later requests wait it off); a negative one refunds, down to a full budget.
    """
    interval = period_s / limit
    base = max(tat, now) if tat is not None else now
    return max(now, base + delta * interval)

