"""Which requests get their forward passes captured: trace-id ratio or a forced header, under a cap.

In: a request's trace id, whether its trace is head-sampled, whether it forces capture.
Out: ``"ratio"``, ``"forced"`` or None, from :class:`CaptureSampler` (called on the event loop by
``otel.kernels.tracer.KernelTracer.on_request``): a request is captured when its trace is sampled,
it is in the ratio or forced, the per-minute cap has room, and the stall budget (budget.py) too.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping

from otel.kernels.budget import StallBudget

_TRACE_ID_LOW = (1 << 64) - 1
_WINDOW_S = 60.0


def in_ratio(trace_id: int, ratio: float) -> bool:
    """Same test as OTel's TraceIdRatioBased: with ratio <= the head ratio, a kernel-sampled
    trace is always a head-sampled one, and every service decides alike for one trace."""
    return (trace_id & _TRACE_ID_LOW) < round(ratio * (_TRACE_ID_LOW + 1))


def is_forced(headers: Mapping[str, str], header: str) -> bool:
    value = headers.get(header) or headers.get(header.lower()) or ""
    return value.strip().lower() in ("1", "true", "yes")


class CaptureSampler:
    """Ratio-or-forced selection under a sliding one-minute cap on captures and, when given, a
    :class:`~otel.kernels.budget.StallBudget`. Not thread-safe."""

    def __init__(self, ratio: float, max_per_minute: int, clock: Callable[[], float] = time.monotonic,
                 budget: StallBudget | None = None) -> None:
        self._ratio = ratio
        self._max = max_per_minute
        self._clock = clock
        self._budget = budget
        self._starts: deque[float] = deque()
        self.rate_limited = 0

    def decide(self, trace_id: int, sampled: bool, forced: bool) -> str | None:
        """``"forced"``, ``"ratio"``, or None (not captured)."""
        return self.admit(trace_id, sampled, forced)[0]

    def admit(self, trace_id: int, sampled: bool, forced: bool) -> tuple[str | None, int]:
        """As :meth:`decide`, with the stall the budget set aside for the capture (to settle
        with ``StallBudget.spent`` or ``refund``)."""
        if not sampled:
            return None, 0
        reason = "forced" if forced else ("ratio" if in_ratio(trace_id, self._ratio) else None)
        if reason is None:
            return None, 0
        now = self._clock()
        while self._starts and now - self._starts[0] >= _WINDOW_S:
            self._starts.popleft()
        if len(self._starts) >= self._max:
            self.rate_limited += 1
            return None, 0
        taken = self._budget.admit() if self._budget is not None else 0
        if taken is None:
            return None, 0
        self._starts.append(now)
        return reason, taken

