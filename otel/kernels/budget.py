"""An adaptive cap on kernel captures: the engine-thread stall they cause stays under a budget.

In: the configured budget (a share of wall-clock time the engine thread may spend stalled by
captures, ``kernels.stall_budget_pct``) and, after every capture, the stall it measured.
Out: :meth:`StallBudget.admit`, asked when a request would be selected: whether a capture fits.

A token bucket of stall time: it fills at ``budget`` seconds of stall per second of wall clock, up to
``burst_s`` seconds' worth, and each admitted capture takes out what a capture is expected to cost
(a moving average of the measured stalls, starting at ``initial_cost_ns``). When the measured stall
of a capture differs from what was taken, the difference is settled with :meth:`spent`. So when
captures get dearer (a larger batch, a slower recorder) fewer are admitted, and the time captures
take from serving tends to ``budget`` whatever the ratio. Thread-safe: the event loop admits, the
engine thread reports.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# Weight of the newest measured stall in the moving average of a capture's cost.
_EWMA = 0.2


class StallBudget:
    """``budget``: stall per wall time (0.01 = 1 %); 0 or less turns the cap off."""

    def __init__(self, budget: float, burst_s: float = 10.0, initial_cost_ns: int = 20_000_000,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._budget = budget
        self._capacity = budget * burst_s * 1e9
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = self._capacity
        self._at = clock()
        self.cost_ns = float(initial_cost_ns)  # expected stall of the next capture
        self.refused = 0

    @property
    def enabled(self) -> bool:
        return self._budget > 0

    def admit(self) -> int | None:
        """Take the expected cost of one capture if it fits; returns what was taken (for
        :meth:`spent`), or None (refused)."""
        if not self.enabled:
            return 0
        with self._lock:
            self._refill()
            if self._tokens < self.cost_ns:
                self.refused += 1
                return None
            taken = int(self.cost_ns)
            self._tokens -= taken
            return taken

    def spent(self, taken_ns: int, stall_ns: int) -> None:
        """A capture admitted with ``taken_ns`` stalled the engine thread ``stall_ns``."""
        if not self.enabled:
            return
        with self._lock:
            self._refill()
            self._tokens = min(self._capacity, self._tokens + taken_ns - stall_ns)
            self.cost_ns += _EWMA * (stall_ns - self.cost_ns)

    def refund(self, taken_ns: int) -> None:
        """An admitted capture that never ran (its request ended first): the cost estimate stays."""
        if not self.enabled:
            return
        with self._lock:
            self._refill()
            self._tokens = min(self._capacity, self._tokens + taken_ns)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._at) * self._budget)
        self._at = now
