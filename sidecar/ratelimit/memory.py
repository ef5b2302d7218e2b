"""Budgets in this process's memory: the single-replica backend and Redis's local fallback.

``charge`` never awaits, so under asyncio no other charge can interleave between the check
and the commit; it is not meant to be shared between threads.

Memory is bounded by ``max_keys``. When full, keys whose TAT has passed are dropped first
(their budget is full, so forgetting them changes nothing); if that frees too little, the
least recently charged keys go, which forgives their remaining debt. Sweeps free 10% of
``max_keys`` at a time, so their cost is spread over many charges.

Reservations (and the concurrency slots they hold) live here until claimed; the number of
open reservations is bounded by the slots and budgets themselves and by their expiry.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sidecar.ratelimit.base import Budget, BudgetState, Claimed, RateLimitResult, Reservation, Slot
from sidecar.ratelimit.gcra import adjust, decide
from sidecar.ratelimit.settle import settle


@dataclass(frozen=True)
class _Open:
    reservation: Reservation  # what claim_now hands out (as a Claimed) when it is settled or expires
    slot_keys: tuple[str, ...]
    expires: float


class MemoryRateLimiter:
    backend = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._clock = clock
        self._max_keys = max_keys
        self._headroom = max(1, max_keys // 10)
        self._tats: OrderedDict[str, float] = OrderedDict()  # key -> TAT, least recently charged first
        self._open: dict[str, _Open] = {}  # reservation id -> open reservation
        self._in_flight: dict[str, set[str]] = {}  # slot key -> reservation ids holding a slot
        self._expiries: list[tuple[float, str]] = []  # heap of (expiry, reservation id); stale entries skipped
        self._expired: list[str] = []  # past expiry, slots freed, waiting for claim_expired

    def __len__(self) -> int:
        return len(self._tats)

    async def charge(self, budgets: Sequence[Budget]) -> RateLimitResult:
        return self.charge_now(budgets)

    def charge_now(self, budgets: Sequence[Budget]) -> RateLimitResult:
        """The synchronous charge (what ``charge`` does, without a coroutine)."""
        return self._charge(self._clock(), budgets, ())

    async def reserve(self, reservation: Reservation) -> RateLimitResult:
        return self.reserve_now(reservation)

    def reserve_now(self, reservation: Reservation) -> RateLimitResult:
        now = self._clock()
        self._expire_slots(now)
        result = self._charge(now, reservation.budgets, reservation.slots)
        if result.allowed:
            keys = tuple(s.key for s in reservation.slots) if reservation.slots else ()
            for key in keys:
                self._in_flight.setdefault(key, set()).add(reservation.reservation_id)
            expires = now + reservation.ttl_s
            self._open[reservation.reservation_id] = _Open(reservation, keys, expires)
            heapq.heappush(self._expiries, (expires, reservation.reservation_id))
        return result

    async def claim(self, reservation_id: str) -> Claimed | None:
        return self.claim_now(reservation_id)

    def claim_now(self, reservation_id: str) -> Claimed | None:
        entry = self._open.pop(reservation_id, None)
        if entry is None:
            return None
        self._free(reservation_id, entry.slot_keys)
        return _claimed(entry.reservation, self.backend)

    async def claim_expired(self) -> list[Claimed]:
        return self.claim_expired_now()

    def claim_expired_now(self) -> list[Claimed]:
        self._expire_slots(self._clock())
        expired, self._expired = self._expired, []
        return [c for c in map(self.claim_now, expired) if c is not None]

    async def adjust(self, claimed: Claimed, delta: int) -> tuple[BudgetState, ...]:
        return self.adjust_now(claimed, delta)

    def adjust_now(self, claimed: Claimed, delta: int) -> tuple[BudgetState, ...]:
        now = self._clock()
        states = []
        for b in claimed.token_budgets:
            tat = adjust(now, self._tats.get(b.key), b.limit, b.period_s, delta)
            if tat > now:
                self._tats[b.key] = tat
                self._tats.move_to_end(b.key)
            else:
                self._tats.pop(b.key, None)
            d = decide(now, tat, b.limit, b.period_s, 0)
            states.append(BudgetState(b.key, b.kind, b.limit, d.remaining, d.reset_s, 0.0))
        return tuple(states)

    async def close(self) -> None:
        self._tats.clear()
        self._open.clear()
        self._in_flight.clear()
        self._expiries.clear()
        self._expired.clear()

    def _charge(self, now: float, budgets: Sequence[Budget], slots: Sequence[Slot]) -> RateLimitResult:
        result = settle(now, budgets, self._tats.get)
        slot_states = (tuple(_slot_state(s.key, s.limit, len(self._in_flight.get(s.key, ()))) for s in slots)
                       if slots else ())
        allowed = result.allowed and all(s.retry_after_s == 0 for s in slot_states)
        if allowed:
            for key, tat in result.new_tats.items():
                self._tats[key] = tat
                self._tats.move_to_end(key)
            if len(self._tats) > self._max_keys:
                self._evict(now)
            if not slots:
                return RateLimitResult(True, result.states, self.backend)
            slot_states = tuple(_slot_state(s.key, s.limit, len(self._in_flight.get(s.key, ())) + 1, taking=True)
                                for s in slots)
            return RateLimitResult(True, result.states + slot_states, self.backend)
        # A denied caller stays recent, so hammering a budget never ages its debt out.
        for b in budgets:
            if b.key in self._tats:
                self._tats.move_to_end(b.key)
        states = result.states
        if result.allowed:  # only a slot was missing: nothing was charged, show the budgets uncharged
            states = settle(now, [_free_of(b) for b in budgets], self._tats.get).states
        return RateLimitResult(False, states + slot_states, self.backend)

    def _expire_slots(self, now: float) -> None:
        """Reservations past their expiry give their slots back before new ones are counted; they
        stay open (claim_expired reports them) without slots."""
        while self._expiries and self._expiries[0][0] <= now:
            _, rid = heapq.heappop(self._expiries)
            entry = self._open.get(rid)
            if entry is None:
                continue  # settled before it expired
            self._free(rid, entry.slot_keys)
            self._open[rid] = _Open(entry.reservation, (), entry.expires)
            self._expired.append(rid)

    def _free(self, reservation_id: str, slot_keys: Sequence[str]) -> None:
        for key in slot_keys:
            holders = self._in_flight.get(key)
            if holders is not None:
                holders.discard(reservation_id)
                if not holders:
                    del self._in_flight[key]

    def _evict(self, now: float) -> None:
        target = self._max_keys - self._headroom
        for key in [k for k, tat in self._tats.items() if tat <= now]:
            del self._tats[key]
        while len(self._tats) > target:
            self._tats.popitem(last=False)


def _slot_state(key: str, limit: int, in_flight: int, taking: bool = False) -> BudgetState:
    """A concurrency slot as a budget state: ``remaining`` slots; a full one says retry in 1 s."""
    full = not taking and in_flight >= limit
    return BudgetState(key, "concurrency", limit, max(0, limit - in_flight), 0.0, 1.0 if full else 0.0)


def _free_of(budget: Budget) -> Budget:
    return Budget(budget.key, budget.limit, budget.period_s, 0, budget.kind)


def _claimed(reservation: Reservation, backend: str) -> Claimed:
    return Claimed(reservation.reservation_id, reservation.tenant,
                   tuple(b for b in reservation.budgets if b.kind == "tokens"), reservation.reserved_cost,
                   reservation.input_weight, reservation.output_weight, backend)
