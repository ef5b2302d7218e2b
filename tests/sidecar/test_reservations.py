"""Reservations and settlement on both backends (memory, real Redis): atomic reserve with
concurrency slots, exactly-once claim, refunds and overruns, expiry at the reserved amount, and
64 concurrent reservations never taking more than the budget."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from prometheus_client import CollectorRegistry

from sidecar.config import DecisionLogConfig, LimitRule, RateLimitConfig
from sidecar.decision_log import DecisionLogger
from sidecar.metrics import SidecarMetrics
from sidecar.ratelimit import (
    BackendUnavailable,
    Budget,
    FallbackRateLimiter,
    MemoryRateLimiter,
    RedisRateLimiter,
    Reservation,
    Slot,
)
from sidecar.ratelimit.base import weighted_cost
from sidecar.ratelimit.descriptors import RequestTokens, limits_for, request_tokens, reservation_for
from sidecar.settlement import ReportError, Settlement, UsageReport


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


DAY = 86400.0


def reservation(rid: str, tokens: int, limit: int = 1000, concurrency: int | None = None, ttl_s: float = 60.0,
                input_weight: float = 1.0, output_weight: float = 1.0) -> Reservation:
    budgets = (Budget("t|requests", 1000, DAY, 1, "requests"), Budget("t|tokens", limit, DAY, tokens, "tokens"))
    slots = (Slot("t|concurrency", concurrency),) if concurrency else ()
    return Reservation(rid, "acme", budgets, slots, ttl_s, tokens, input_weight, output_weight)


@pytest.fixture(params=["memory", "redis"])
async def backend(request):
    """(limiter, clock-or-None): memory runs on a fake clock; Redis on its own TIME."""
    if request.param == "memory":
        clock = FakeClock()
        limiter = MemoryRateLimiter(clock=clock)
        yield limiter, clock
        await limiter.close()
    else:
        url = request.getfixturevalue("redis_url")
        limiter = RedisRateLimiter(url, timeout_s=2.0, key_prefix="test:res:")
        yield limiter, None
        await limiter.close()


def tokens_remaining(result) -> int:
    return next(s.remaining for s in result.states if s.kind == "tokens")


def settlement_of(limiter) -> tuple[Settlement, io.StringIO, SidecarMetrics]:
    metrics = SidecarMetrics(CollectorRegistry())
    out = io.StringIO()
    return Settlement(limiter, metrics, DecisionLogger(DecisionLogConfig(), stream=out)), out, metrics


async def test_reserve_settle_refunds_exactly_and_only_once(backend) -> None:
    limiter, _ = backend
    settlement, log, metrics = settlement_of(limiter)
    first = await limiter.reserve(reservation("a" * 32, 600))
    assert first.allowed and tokens_remaining(first) == 400
    # a second 600 does not fit while the first is reserved
    assert not (await limiter.reserve(reservation("b" * 32, 600))).allowed
    settled = await settlement.settle(UsageReport("a" * 32, 12, 28))
    assert (settled.settled, settled.charged, settled.refunded, settled.reserved) == (True, 40, 560, 600)
    again = await settlement.settle(UsageReport("a" * 32, 12, 28))
    assert not again.settled  # idempotent: the repeat changes nothing
    probe = await limiter.reserve(reservation("c" * 32, 0))
    assert tokens_remaining(probe) == 960  # exactly the 40 used are spent (a day's budget refills 1 in 86 s)
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    assert [(x["kind"], x["outcome"], x["charged"], x["refunded"]) for x in lines] == [
        ("settlement", "settled", 40, 560)]
    assert metrics.settlements.labels("unknown")._value.get() == 1


async def test_overrun_is_charged_even_past_the_budget(backend) -> None:
    limiter, _ = backend
    settlement, _, _ = settlement_of(limiter)
    assert (await limiter.reserve(reservation("a" * 32, 100, limit=200))).allowed
    settled = await settlement.settle(UsageReport("a" * 32, 50, 250))  # generated more than reserved
    assert settled.charged == 300 and settled.refunded == 0
    denied = await limiter.reserve(reservation("b" * 32, 1, limit=200))
    assert not denied.allowed and tokens_remaining(denied) == 0


async def test_weights_price_input_and_output_apart(backend) -> None:
    limiter, _ = backend
    settlement, _, _ = settlement_of(limiter)
    cost = weighted_cost(10, 100, 0.5, 3.0)
    assert cost == 305
    assert (await limiter.reserve(reservation("a" * 32, cost, input_weight=0.5, output_weight=3.0))).allowed
    settled = await settlement.settle(UsageReport("a" * 32, 10, 7))
    assert (settled.charged, settled.refunded) == (26, 279)  # ceil(5 + 21)


async def test_concurrency_slots_are_taken_atomically_and_freed_by_settlement(backend) -> None:
    limiter, _ = backend
    settlement, _, _ = settlement_of(limiter)
    assert (await limiter.reserve(reservation("a" * 32, 1, concurrency=2))).allowed
    assert (await limiter.reserve(reservation("b" * 32, 1, concurrency=2))).allowed
    full = await limiter.reserve(reservation("c" * 32, 1, concurrency=2))
    assert not full.allowed
    assert [s.retry_after_s for s in full.states if s.kind == "concurrency"] == [1.0]
    # nothing was charged by the refused reservation
    assert tokens_remaining(full) == 998
    await settlement.settle(UsageReport("a" * 32, 1, 0))
    assert (await limiter.reserve(reservation("c" * 32, 1, concurrency=2))).allowed


async def test_an_unreported_reservation_expires_at_its_reserved_amount(backend) -> None:
    limiter, clock = backend
    settlement, log, metrics = settlement_of(limiter)
    ttl = 60.0 if clock else 0.3
    assert (await limiter.reserve(reservation("a" * 32, 300, concurrency=1, ttl_s=ttl))).allowed
    assert await settlement.expire() == 0
    if clock:
        clock.now += ttl
    else:
        await asyncio.sleep(ttl + 0.05)
    # the slot is free again even before the sweep
    assert (await limiter.reserve(reservation("b" * 32, 0, concurrency=1, ttl_s=ttl))).allowed
    assert await settlement.expire() >= 1
    late = await settlement.settle(UsageReport("a" * 32, 1, 1))
    assert not late.settled  # a late report after expiry changes nothing
    records = [json.loads(line) for line in log.getvalue().splitlines()]
    first = next(r for r in records if r["decision_id"] == "a" * 32)
    assert (first["outcome"], first["charged"], first["refunded"]) == ("expired", 300, 0)
    assert metrics.tokens.labels("acme", "charged")._value.get() >= 300


async def test_64_concurrent_reservations_never_exceed_the_budget(backend) -> None:
    limiter, _ = backend
    results = await asyncio.gather(*(limiter.reserve(reservation(f"{i:032x}", 70, limit=1000, concurrency=64))
                                     for i in range(64)))
    admitted = sum(r.allowed for r in results)
    assert admitted == 14  # 14 * 70 = 980 <= 1000 < 15 * 70


async def test_fallback_settles_where_the_reservation_was_made(redis_server, redis_url) -> None:
    clock = FakeClock()
    limiter = FallbackRateLimiter(RedisRateLimiter(redis_url, timeout_s=0.5, key_prefix="test:fb:"), "local",
                                  MemoryRateLimiter(clock=clock), clock=clock)
    settlement, _, _ = settlement_of(limiter)
    shared = await limiter.reserve(reservation("a" * 32, 500))
    assert shared.allowed and shared.backend == "redis"
    redis_server.kill()
    local = await limiter.reserve(reservation("b" * 32, 500))
    assert local.allowed and local.degraded and local.backend == "memory"
    settled = await settlement.settle(UsageReport("b" * 32, 5, 5))
    assert settled.settled and settled.refunded == 490
    with pytest.raises(BackendUnavailable):  # Redis down: the reporter is told to try again
        await settlement.settle(UsageReport("a" * 32, 5, 5))
    await limiter.close()


def test_reservation_prices_prompt_plus_allowance_with_the_rules() -> None:
    config = RateLimitConfig(default_max_tokens=16)
    rule = LimitRule(tokens=1000, concurrency=3, input_weight=1.0, output_weight=2.0, default_max_tokens=32)
    limits = limits_for("acme", "m", "/v1/completions", None, [rule])
    assert limits is not None and limits.concurrency == 3
    counted = request_tokens({"prompt": "hello world"}, config, counted_prompt=3,
                             default_max_tokens=limits.default_max_tokens)
    assert counted == RequestTokens(3, 32, True)
    estimated = request_tokens({"prompt": "hello world", "max_tokens": 5}, config)
    assert estimated == RequestTokens(3, 5, False)  # 11 chars / 4
    res = reservation_for("a" * 32, limits, "acme", "m", "/v1/completions", counted, 30.0)
    assert res.reserved_cost == 3 + 64 and [b.cost for b in res.budgets] == [67]
    assert res.slots[0].limit == 3


def test_policy_limits_are_strict() -> None:
    policy = {"tokens": 100, "concurrency": 2, "input_weight": 0.5, "output_weight": 4, "enforce_midstream": True}
    limits = limits_for("acme", "m", "/r", policy, [])
    assert limits is not None and (limits.output_weight, limits.enforce_midstream) == (4.0, True)
    for bad in ({"tokens": 0}, {"concurrency": -1}, {"output_weight": 0}, {"input_weight": "x"},
                {"enforce_midstream": "yes"}):
        with pytest.raises(ValueError):
            limits_for("acme", "m", "/r", bad, [])
    assert limits_for("acme", "m", "/r", {"requests": 5}, []).tokens is None  # a route that costs no tokens


@pytest.mark.parametrize("report, field", [
    ({"decision_id": "nothex", "prompt_tokens": 1, "completion_tokens": 1}, "decision_id"),
    ({"decision_id": "a" * 32, "prompt_tokens": -1, "completion_tokens": 1}, "prompt_tokens"),
    ({"decision_id": "a" * 32, "prompt_tokens": 1, "completion_tokens": 1.5}, "completion_tokens"),
    ({"decision_id": "a" * 32, "prompt_tokens": 1, "completion_tokens": 1, "ending": "boom"}, "ending"),
])
def test_malformed_reports_name_the_field(report: dict, field: str) -> None:
    with pytest.raises(ReportError, match=field):
        UsageReport.parse(report)


async def test_prompt_counter_falls_back_to_none_when_the_server_cannot_answer() -> None:
    from aiohttp import web

    from sidecar.ratelimit.count import ServerPromptCounter
    from tests.procs import free_port

    async def tokenize(request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("prompt") == "slow":
            await asyncio.sleep(1.0)
        if body.get("prompt") == "bad":
            return web.json_response({"error": {"message": "no"}}, status=400)
        return web.json_response({"count": len(body["prompt"])})

    app = web.Application()
    app.router.add_post("/tokenize", tokenize)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    counter = ServerPromptCounter(f"http://127.0.0.1:{port}/tokenize", timeout_s=0.3)
    dead = ServerPromptCounter(f"http://127.0.0.1:{free_port()}/tokenize", timeout_s=0.3)
    try:
        assert await counter.count('{"prompt": "abcd"}', {"prompt": "abcd"}) == 4
        assert await counter.count('{"prompt": "bad"}', {"prompt": "bad"}) is None
        assert await counter.count('{"prompt": "slow"}', {"prompt": "slow"}) is None
        assert await counter.count('{"input": "x"}', {"input": "x"}) is None  # nothing to count: not asked
        assert await dead.count('{"prompt": "abcd"}', {"prompt": "abcd"}) is None
    finally:
        await counter.close()
        await dead.close()
        await runner.cleanup()
