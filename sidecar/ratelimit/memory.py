"""Budgets in this process's memory: the single-replica backend and Redis's local fallback.

``charge`` never awaits, so under asyncio no other charge can interleave between the check
and the commit; it is not meant to be shared between threads.

Memory is bounded by ``max_keys``. When full, keys whose TAT has passed are dropped first
(their budget is full, so forgetting them changes nothing); if that frees too little, the
least recently charged keys go, which forgives their remaining debt. Sweeps free 10% of
``max_keys`` at a time, so their cost is spread over many charges.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from sidecar.ratelimit.base import Budget, RateLimitResult
from sidecar.ratelimit.settle import settle


class MemoryRateLimiter:
    backend = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._clock = clock
        self._max_keys = max_keys
        self._headroom = max(1, max_keys // 10)
        self._tats: OrderedDict[str, float] = OrderedDict()  # key -> TAT, least recently charged first

    def __len__(self) -> int:
        return len(self._tats)

    async def charge(self, budgets: Sequence[Budget]) -> RateLimitResult:
        return self.charge_now(budgets)

    def charge_now(self, budgets: Sequence[Budget]) -> RateLimitResult:
        """The synchronous charge (what ``charge`` does, without a coroutine)."""
        now = self._clock()
        result = settle(now, budgets, self._tats.get)
        if result.allowed:
            for key, tat in result.new_tats.items():
                self._tats[key] = tat
                self._tats.move_to_end(key)
            if len(self._tats) > self._max_keys:
                self._evict(now)
        else:
            # A denied caller stays recent, so hammering a budget never ages its debt out.
            for b in budgets:
                if b.key in self._tats:
                    self._tats.move_to_end(b.key)
        return RateLimitResult(result.allowed, result.states, self.backend)

    async def close(self) -> None:
        self._tats.clear()

    def _evict(self, now: float) -> None:
        target = self._max_keys - self._headroom
        for key in [k for k, tat in self._tats.items() if tat <= now]:
            del self._tats[key]
        while len(self._tats) > target:
            self._tats.popitem(last=False)
