"""What happens to budgets when Redis is down, and the factory that builds the configured limiter.

``redis_failure_mode``:
  "local" -> charge the in-memory budgets of this replica (result.degraded = True);
  "allow" -> allowed with no states (result.degraded = True);
  "deny"  -> raise RateLimitUnavailable, which the server answers with 503.

After a failure Redis is left alone for ``retry_interval_s`` (so a dead Redis costs each request
nothing, not a timeout), then tried again by the next request; once it answers, its budgets are
used again. Each request is charged in exactly one backend (see redis.py for the timeout case).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from sidecar.config import RateLimitConfig
from sidecar.ratelimit.base import (
    BackendUnavailable,
    Budget,
    BudgetState,
    Claimed,
    Reservation,
    RateLimiter,
    RateLimitResult,
    RateLimitUnavailable,
)
from sidecar.ratelimit.memory import MemoryRateLimiter
from sidecar.ratelimit.redis import RedisRateLimiter

log = logging.getLogger(__name__)

FAILURE_MODES = ("local", "allow", "deny")


class FallbackRateLimiter:
    """A shared limiter (Redis) with a failure mode for when it does not answer."""

    def __init__(self, shared: RateLimiter, failure_mode: str, local: MemoryRateLimiter | None = None,
                 clock: Callable[[], float] = time.monotonic, retry_interval_s: float = 1.0) -> None:
        if failure_mode not in FAILURE_MODES:
            raise ValueError(f"failure_mode must be one of {', '.join(FAILURE_MODES)}")
        self._shared = shared
        self._failure_mode = failure_mode
        self._local = local if local is not None else MemoryRateLimiter()
        self._clock = clock
        self._retry_interval_s = retry_interval_s
        self._down_until: float | None = None  # None: the shared backend is believed up

    @property
    def degraded(self) -> bool:
        return self._down_until is not None

    async def charge(self, budgets: Sequence[Budget]) -> RateLimitResult:
        return await self._shared_or_fail(lambda: self._shared.charge(budgets), lambda: self._fail(budgets))

    async def reserve(self, reservation: Reservation) -> RateLimitResult:
        return await self._shared_or_fail(lambda: self._shared.reserve(reservation),
                                          lambda: self._fail(reservation.budgets, reservation))

    async def _shared_or_fail(self, shared: Callable[[], Awaitable[RateLimitResult]],
                              fail: Callable[[], RateLimitResult]) -> RateLimitResult:
        if self._down_until is not None and self._clock() < self._down_until:
            return fail()
        try:
            result = await shared()
        except BackendUnavailable as exc:
            if self._down_until is None:
                log.warning("rate limit backend unavailable (%s); failure mode %s", exc, self._failure_mode)
            self._down_until = self._clock() + self._retry_interval_s
            return fail()
        if self._down_until is not None:
            log.info("rate limit backend is back")
            self._down_until = None
        return result

    async def claim(self, reservation_id: str) -> Claimed | None:
        """A reservation lives where it was made: here if Redis was down then, else in Redis.
        Redis not answering now raises BackendUnavailable, so the reporter tries again later (a
        claim that did run before the timeout makes the retry find nothing: charged as reserved)."""
        local = self._local.claim_now(reservation_id)
        if local is not None:
            return local
        return await self._shared.claim(reservation_id)

    async def claim_expired(self) -> list[Claimed]:
        expired = self._local.claim_expired_now()
        try:
            expired += await self._shared.claim_expired()
        except BackendUnavailable:
            pass  # the next sweep finds them
        return expired

    async def adjust(self, claimed: Claimed, delta: int) -> tuple[BudgetState, ...]:
        """Where the reservation was charged: ``claimed.backend``."""
        if claimed.backend == self._local.backend:
            return self._local.adjust_now(claimed, delta)
        try:
            return await self._shared.adjust(claimed, delta)
        except BackendUnavailable as exc:
            log.warning("settlement adjustment lost (%s): charged at the reserved amount", exc)
            return ()

    def _fail(self, budgets: Sequence[Budget], reservation: Reservation | None = None) -> RateLimitResult:
        if self._failure_mode == "deny":
            raise RateLimitUnavailable("rate limit backend unavailable")
        if self._failure_mode == "allow":
            return RateLimitResult(True, (), getattr(self._shared, "backend", "shared"), degraded=True)
        if reservation is not None:
            return dataclasses.replace(self._local.reserve_now(reservation), degraded=True)
        return dataclasses.replace(self._local.charge_now(budgets), degraded=True)

    async def close(self) -> None:
        await self._shared.close()
        await self._local.close()


def build_rate_limiter(config: RateLimitConfig) -> RateLimiter | None:
    """The limiter ``config`` asks for, or None when rate limits are off: the one place that
    decides whether they are on (``shadow`` is the authorizer's business: it ignores denials)."""
    if not config.enabled:
        return None
    if config.backend == "memory":
        return MemoryRateLimiter()
    redis_limiter = RedisRateLimiter(config.redis_url, config.redis_timeout_s, config.redis_key_prefix)
    return FallbackRateLimiter(redis_limiter, config.redis_failure_mode)
