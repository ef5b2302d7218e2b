"""Rate limits: GCRA math, all-or-nothing charges, memory bounds, Redis (real server) and its failure modes."""

from __future__ import annotations

import asyncio
import math
import signal
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from sidecar.config import LimitRule, RateLimitConfig
from sidecar.ratelimit import (
    BackendUnavailable,
    Budget,
    BudgetState,
    FallbackRateLimiter,
    MemoryRateLimiter,
    RateLimitResult,
    RateLimitUnavailable,
    RedisRateLimiter,
    budgets_for,
    build_rate_limiter,
    estimate_tokens,
    rate_limit_headers,
    upstream_rate_limit_headers,
)
from sidecar.ratelimit.descriptors import budget_key
from sidecar.ratelimit.gcra import decide
from tests import procs


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def requests(key: str = "t", limit: int = 10, period_s: float = 60.0, cost: int = 1) -> Budget:
    return Budget(f"{key}|requests", limit, period_s, cost, "requests")


def tokens(key: str = "t", limit: int = 100, period_s: float = 60.0, cost: int = 10) -> Budget:
    return Budget(f"{key}|tokens", limit, period_s, cost, "tokens")


# --- GCRA -----------------------------------------------------------------------------------


def test_gcra_full_burst_then_exact_retry_after() -> None:
    tat = None
    for i in range(10):
        d = decide(0.0, tat, 10, 60.0, 1)
        assert d.allowed and d.remaining == 9 - i
        tat = d.tat
    assert tat == pytest.approx(60.0)
    d = decide(0.0, tat, 10, 60.0, 1)
    assert not d.allowed and d.remaining == 0
    assert d.retry_after_s == pytest.approx(6.0)  # one emission interval T = 60/10
    assert d.reset_s == pytest.approx(60.0)
    assert d.tat == tat  # a denial changes nothing


def test_gcra_refill_is_smooth() -> None:
    tat = decide(0.0, None, 10, 60.0, 10).tat  # the whole burst at once
    assert not decide(5.9, tat, 10, 60.0, 1).allowed
    d = decide(6.0, tat, 10, 60.0, 1)
    assert d.allowed and d.remaining == 0
    assert decide(30.0, tat, 10, 60.0, 0).remaining == 5
    assert decide(60.0, tat, 10, 60.0, 0).remaining == 10
    assert decide(600.0, tat, 10, 60.0, 10).allowed  # idle time does not bank beyond one burst
    assert not decide(600.0, decide(600.0, tat, 10, 60.0, 10).tat, 10, 60.0, 1).allowed


def test_gcra_cost_and_retry_after() -> None:
    tat = decide(0.0, None, 100, 60.0, 90).tat  # T = 0.6 s, 10 left
    d = decide(0.0, tat, 100, 60.0, 25)
    assert not d.allowed and d.remaining == 10
    assert d.retry_after_s == pytest.approx(15 * 0.6)
    assert decide(d.retry_after_s, tat, 100, 60.0, 25).allowed


def test_gcra_fractional_interval_fits_exactly() -> None:
    tat = None
    for _ in range(3):
        d = decide(0.0, tat, 3, 1.0, 1)
        assert d.allowed
        tat = d.tat
    assert not decide(0.0, tat, 3, 1.0, 1).allowed


def test_gcra_cost_over_limit_is_never_allowed() -> None:
    d = decide(0.0, None, 10, 60.0, 11)
    assert not d.allowed and d.impossible
    assert d.retry_after_s == 60.0  # documented: a full refill, though waiting will not help
    assert d.remaining == 10
    assert not decide(1e9, None, 10, 60.0, 11).allowed


def test_gcra_rejects_bad_budget() -> None:
    with pytest.raises(ValueError):
        decide(0.0, None, 0, 60.0, 1)
    with pytest.raises(ValueError):
        Budget("k", 10, 60.0, -1, "tokens")


# --- memory ---------------------------------------------------------------------------------


async def test_memory_all_or_nothing() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    result = await limiter.charge([requests(), tokens(cost=95)])
    assert result.allowed and result.backend == "memory" and not result.degraded
    assert [s.remaining for s in result.states] == [9, 5]
    result = await limiter.charge([requests(), tokens(cost=10)])  # tokens exhausted
    assert not result.allowed
    req_state, tok_state = result.states
    assert req_state.remaining == 9 and req_state.retry_after_s == 0.0  # not consumed
    assert tok_state.remaining == 5 and tok_state.retry_after_s == pytest.approx(5 * 0.6)
    assert result.most_constraining() == tok_state
    result = await limiter.charge([requests()])
    assert result.allowed and result.states[0].remaining == 8  # only the first charge counted


async def test_memory_same_key_twice_is_charged_twice() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock())
    assert not (await limiter.charge([requests(limit=3, cost=2), requests(limit=3, cost=2)])).allowed
    assert (await limiter.charge([requests(limit=3, cost=2), requests(limit=3, cost=1)])).allowed
    assert not (await limiter.charge([requests(limit=3)])).allowed


async def test_memory_is_bounded_lru() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock(), max_keys=100)
    for i in range(1000):
        await limiter.charge([requests(f"k{i}")])
        assert len(limiter) <= 100
    assert len(limiter) >= 90


async def test_memory_evicts_expired_keys_before_live_ones() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock, max_keys=10)
    hot = requests("hot", limit=1, period_s=3600.0)
    assert (await limiter.charge([hot])).allowed  # least recently used, but still in debt
    for i in range(9):
        await limiter.charge([requests(f"cold{i}", period_s=1.0)])
    clock.now += 10  # the cold keys' budgets are full again
    for i in range(5):
        await limiter.charge([requests(f"new{i}")])
    assert len(limiter) <= 10
    assert not (await limiter.charge([hot])).allowed  # its debt survived eviction


# --- Redis ----------------------------------------------------------------------------------


@pytest.fixture
async def redis_limiter(redis_url: str):
    limiter = RedisRateLimiter(redis_url, timeout_s=1.0, key_prefix="test:rl:")
    yield limiter
    await limiter.close()


async def test_redis_budget(redis_limiter: RedisRateLimiter) -> None:
    for i in range(3):
        result = await redis_limiter.charge([requests(limit=3)])
        assert result.allowed and result.backend == "redis"
        assert result.states[0].remaining == 2 - i
    result = await redis_limiter.charge([requests(limit=3)])
    assert not result.allowed
    assert result.states[0].remaining == 0
    assert 19.0 < result.states[0].retry_after_s <= 20.0  # T = 60/3
    assert 59.0 < result.states[0].reset_s <= 60.0


async def test_redis_all_or_nothing(redis_limiter: RedisRateLimiter) -> None:
    assert (await redis_limiter.charge([requests(), tokens(cost=95)])).allowed
    result = await redis_limiter.charge([requests(), tokens(cost=10)])
    assert not result.allowed
    assert result.states[0].remaining == 9 and result.states[0].retry_after_s == 0.0
    assert result.states[1].remaining == 5 and result.states[1].retry_after_s > 2.9
    result = await redis_limiter.charge([requests()])
    assert result.allowed and result.states[0].remaining == 8
    assert not (await redis_limiter.charge([requests(limit=3, cost=2), requests(limit=3, cost=2)])).allowed


async def test_redis_replicas_share_one_budget(redis_url: str) -> None:
    a = RedisRateLimiter(redis_url, timeout_s=1.0, key_prefix="shared:")
    b = RedisRateLimiter(redis_url, timeout_s=1.0, key_prefix="shared:")
    try:
        verdicts = [(await (a if i % 2 else b).charge([requests(limit=5)])).allowed for i in range(8)]
        assert verdicts == [True] * 5 + [False] * 3
    finally:
        await a.close()
        await b.close()


async def test_concurrent_checks_share_round_trips_and_stay_exact(redis_limiter: RedisRateLimiter,
                                                                   redis_url: str) -> None:
    """Checks that reach Redis in one event-loop turn go as one pipeline; each script is still
    atomic, so a budget of 10 admits exactly 10 of 40 concurrent checks, also right after the
    scripts vanished from Redis (SCRIPT FLUSH, as after a restart: NOSCRIPT, loaded once again)."""
    assert redis_limiter._pipe is not None  # the lean connection (plain redis://)
    for attempt, key in enumerate(("batched", "after-flush")):
        if attempt:
            client = aioredis.Redis.from_url(redis_url)
            await client.script_flush()
            await client.aclose()
        results = await asyncio.gather(*(redis_limiter.charge([requests(key, limit=10)]) for _ in range(40)))
        assert sum(r.allowed for r in results) == 10
        assert sorted(r.states[0].remaining for r in results if r.allowed) == list(range(10))
    assert 1 <= redis_limiter._pipe.round_trips <= 4  # 80 checks, a handful of round trips


async def test_redis_keys_expire(redis_limiter: RedisRateLimiter, redis_url: str) -> None:
    await redis_limiter.charge([requests(limit=10, period_s=60.0, cost=4), tokens(period_s=2.0, cost=100)])
    client = aioredis.Redis.from_url(redis_url)
    try:
        req_ttl = await client.pttl("test:rl:t|requests")
        tok_ttl = await client.pttl("test:rl:t|tokens")
        assert 23_000 < req_ttl <= 24_000  # expires when the budget is full again (4 x 6 s)
        assert 1_000 < tok_ttl <= 2_000  # at most one period
        assert await client.ttl("test:rl:t|requests") > 0
    finally:
        await client.aclose()


async def test_redis_down_failure_modes(redis_server: procs.Proc, redis_url: str) -> None:
    limiters = {mode: FallbackRateLimiter(RedisRateLimiter(redis_url, timeout_s=0.5), mode)
                for mode in ("local", "allow", "deny")}
    try:
        for mode, limiter in limiters.items():
            result = await limiter.charge([requests(mode, limit=2)])
            assert result.allowed and result.backend == "redis" and not result.degraded
        redis_server.kill()

        local = limiters["local"]
        verdicts = [await local.charge([requests("local", limit=2)]) for _ in range(3)]
        assert [r.allowed for r in verdicts] == [True, True, False]
        assert all(r.degraded and r.backend == "memory" for r in verdicts)

        result = await limiters["allow"].charge([requests("allow", limit=2)])
        assert result.allowed and result.degraded and result.states == ()

        with pytest.raises(RateLimitUnavailable):
            await limiters["deny"].charge([requests("deny", limit=2)])
    finally:
        for limiter in limiters.values():
            await limiter.close()


async def test_redis_recovers_without_recreating_limiter(redis_server: procs.Proc, redis_url: str,
                                                         tmp_path: Path) -> None:
    clock = FakeClock()
    local = MemoryRateLimiter(clock=clock)
    limiter = FallbackRateLimiter(RedisRateLimiter(redis_url, timeout_s=0.5), "local", local=local,
                                  clock=clock, retry_interval_s=1.0)
    budget = requests(limit=5)
    restarted = None
    try:
        assert (await limiter.charge([budget])).backend == "redis"
        redis_server.kill()
        result = await limiter.charge([budget])
        assert result.degraded and result.backend == "memory"
        restarted = procs.start_redis(tmp_path / "redis-again", port=redis_server.ports["port"])
        # Within retry_interval_s Redis is not tried again: still local.
        assert (await limiter.charge([budget])).backend == "memory"
        local_before = local.charge_now([Budget(budget.key, 5, 60.0, 0, "requests")]).states[0].remaining
        assert local_before == 3

        clock.now += 1.5
        results = [await limiter.charge([budget]) for _ in range(6)]
        assert all(r.backend == "redis" and not r.degraded for r in results)
        # The fresh Redis saw only these charges (none from the outage), and local saw none of them.
        assert [r.allowed for r in results] == [True] * 5 + [False]
        assert local.charge_now([Budget(budget.key, 5, 60.0, 0, "requests")]).states[0].remaining == local_before
        assert not limiter.degraded
    finally:
        await limiter.close()
        if restarted is not None:
            restarted.stop()


def test_build_rate_limiter() -> None:
    assert isinstance(build_rate_limiter(RateLimitConfig()), MemoryRateLimiter)
    assert build_rate_limiter(RateLimitConfig(enabled=False)) is None  # off: decided here, nowhere else
    assert isinstance(build_rate_limiter(RateLimitConfig(backend="redis")), FallbackRateLimiter)


# --- headers --------------------------------------------------------------------------------


def test_headers_allowed_and_denied() -> None:
    req = BudgetState("r", "requests", 100, 60, 24.2, 0.0)
    tok = BudgetState("t", "tokens", 1000, 100, 54.01, 0.0)
    allowed = RateLimitResult(True, (req, tok), "memory")
    assert rate_limit_headers(allowed) == {"RateLimit-Limit": "1000", "RateLimit-Remaining": "100",
                                           "RateLimit-Reset": "55"}
    assert upstream_rate_limit_headers(allowed) == {"x-kernelgate-ratelimit-remaining-requests": "60",
                                                    "x-kernelgate-ratelimit-remaining-tokens": "100"}
    denied = RateLimitResult(False, (req, BudgetState("t", "tokens", 1000, 3, 59.9, 0.2)), "redis")
    assert rate_limit_headers(denied) == {"RateLimit-Limit": "1000", "RateLimit-Remaining": "3",
                                          "RateLimit-Reset": "60", "Retry-After": "1"}
    assert rate_limit_headers(RateLimitResult(True, (), "redis", degraded=True)) == {}
    assert upstream_rate_limit_headers(RateLimitResult(True, (), "disabled")) == {}


# --- descriptors ----------------------------------------------------------------------------


RULES = [
    LimitRule(tenant="acme", model="llama-*", requests=10, tokens=1000, unit="minute"),
    LimitRule(tenant="*", route="/v1/embeddings", requests=100, unit="second"),
    LimitRule(tenant="*", requests=5, unit="hour"),
]


def test_policy_limit_takes_precedence() -> None:
    budgets = budgets_for("acme", "llama-3", "/v1/chat/completions",
                          {"requests": 2, "tokens": 500, "unit": "day"}, RULES, 42)
    assert budgets == [
        Budget("tenant=acme|model=llama-3|route=/v1/chat/completions|requests", 2, 86400.0, 1, "requests"),
        Budget("tenant=acme|model=llama-3|route=/v1/chat/completions|tokens", 500, 86400.0, 42, "tokens"),
    ]
    assert [b.kind for b in budgets_for("acme", "m", "/r", {"tokens": 9}, RULES, 1)] == ["tokens"]
    for bad in ({"requests": 0}, {"requests": "10"}, {"tokens": True}, {"requests": 1, "unit": "week"}):
        with pytest.raises(ValueError):
            budgets_for("acme", "m", "/r", bad, RULES, 1)


def test_first_matching_rule() -> None:
    first = budgets_for("acme", "llama-3", "/v1/completions", None, RULES, 7)
    assert [(b.kind, b.limit, b.period_s, b.cost) for b in first] == [("requests", 10, 60.0, 1),
                                                                       ("tokens", 1000, 60.0, 7)]
    second = budgets_for("acme", "mistral", "/v1/embeddings", None, RULES, 7)
    assert [(b.kind, b.limit, b.period_s) for b in second] == [("requests", 100, 1.0)]
    third = budgets_for(None, None, "/v1/completions", None, RULES, 7)
    assert [(b.key, b.limit, b.period_s) for b in third] == [
        ("tenant=|model=|route=/v1/completions|requests", 5, 3600.0)]
    assert budgets_for("x", "m", "/r", None, RULES[:1], 7) == []
    assert budgets_for("x", "m", "/r", None, [], 7) == []


def test_key_values_are_escaped() -> None:
    assert budget_key("a|b", "m=1", "/r%", "tokens") == "tenant=a%7Cb|model=m%3D1|route=/r%25|tokens"
    assert budget_key("a|model=b", "", "/r", "requests") != budget_key("a", "b", "/r", "requests")


def test_estimate_tokens() -> None:
    config = RateLimitConfig(default_max_tokens=16, chars_per_token=4.0)
    assert estimate_tokens(None, config) == 0
    assert estimate_tokens({"prompt": "x" * 10, "max_tokens": 100}, config) == 3 + 100
    assert estimate_tokens({"prompt": ["abcd", "ab"]}, config) == 2 + 16
    assert estimate_tokens({"prompt": [1, 2, 3], "max_tokens": 0}, config) == 3
    assert estimate_tokens({"prompt": [[1, 2], [3]], "max_tokens": 1}, config) == 4
    chat = {"messages": [{"role": "system", "content": "x" * 8},
                         {"role": "user", "content": [{"type": "text", "text": "y" * 4},
                                                      {"type": "image_url", "image_url": {"url": "u"}}]}],
            "max_completion_tokens": 50}
    assert estimate_tokens(chat, config) == 3 + 50
    assert estimate_tokens({"prompt": "abc", "max_tokens": "lots"}, config) == 1 + 16
    assert estimate_tokens({"prompt": "abc", "max_tokens": None, "max_completion_tokens": 5}, config) == 1 + 5
    assert estimate_tokens({"prompt": "abc", "max_tokens": -5}, config) == 1
    assert estimate_tokens({"prompt": "abc", "max_tokens": True}, config) == 1 + 16
    assert estimate_tokens({"prompt": "abc", "max_tokens": 10, "n": 3}, config) == 1 + 30
    assert estimate_tokens({"messages": "not a list", "prompt": 5.5}, config) == 16
    assert estimate_tokens({}, RateLimitConfig(chars_per_token=3.0, default_max_tokens=0)) == 0
    assert math.ceil(7 / 3.0) == estimate_tokens({"prompt": "x" * 7, "max_tokens": 0},
                                                 RateLimitConfig(chars_per_token=3.0))


async def test_redis_timeout_is_backend_unavailable(redis_server: procs.Proc, redis_url: str) -> None:
    limiter = RedisRateLimiter(redis_url, timeout_s=0.2)
    try:
        assert (await limiter.charge([requests()])).allowed
        redis_server.popen.send_signal(signal.SIGSTOP)  # connected, but silent
        try:
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await limiter.charge([requests()])
            assert time.monotonic() - started < 1.0
            written = limiter._pipe.round_trips
            await asyncio.sleep(0.3)  # the aborted connection's loss must not re-send the batch answered 503
            assert limiter._pipe.round_trips == written
        finally:
            redis_server.popen.send_signal(signal.SIGCONT)
        result = await limiter.charge([requests()])
        assert result.allowed and result.backend == "redis"
        assert limiter._pipe.round_trips == written + 1
    finally:
        await limiter.close()


async def test_the_lean_redis_connection_authenticates_and_selects_the_database(redis_server: procs.Proc) -> None:
    """The check path's own Redis connection (sidecar/ratelimit/resp.py) honours the URL's password
    and database as redis-py does; a wrong password is BackendUnavailable, not a silent pass."""
    port = redis_server.ports["port"]
    admin = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    await admin.config_set("requirepass", "s3cret")
    await admin.aclose()
    good = RedisRateLimiter(f"redis://:s3cret@127.0.0.1:{port}/3", timeout_s=1.0, key_prefix="db3:")
    bad = RedisRateLimiter(f"redis://:wrong@127.0.0.1:{port}/3", timeout_s=1.0, key_prefix="db3:")
    check = aioredis.Redis.from_url(f"redis://:s3cret@127.0.0.1:{port}/3")
    try:
        assert good._pipe is not None
        results = [await good.charge([requests("lean", limit=3)]) for _ in range(4)]
        assert [r.allowed for r in results] == [True, True, True, False]
        assert await check.exists("db3:lean|requests") == 1
        zero = aioredis.Redis.from_url(f"redis://:s3cret@127.0.0.1:{port}/0")
        assert await zero.exists("db3:lean|requests") == 0
        await zero.aclose()
        with pytest.raises(BackendUnavailable):
            await bad.charge([requests("lean", limit=3)])
    finally:
        await check.aclose()
        await good.close()
        await bad.close()


async def test_redis_py_pipelines_where_the_lean_connection_does_not_apply(redis_url: str) -> None:
    """A TLS or Unix-socket URL keeps redis-py's pipeline: the same exact budget under concurrency."""
    limiter = RedisRateLimiter(redis_url, timeout_s=1.0, key_prefix="fallback:")
    limiter._pipe = None  # as RespPipe.supports() leaves it for rediss:// and unix://
    try:
        results = await asyncio.gather(*(limiter.charge([requests("py", limit=10)]) for _ in range(40)))
        assert sum(r.allowed for r in results) == 10
        assert (await limiter.charge([requests("py-alone", limit=1)])).allowed
    finally:
        await limiter.close()


def test_the_lean_connection_encodes_commands_as_redis_py_does() -> None:
    """resp.command (hiredis's packer) writes the bytes redis-py's encoder writes, for every argument
    type the reserve sends (str incl. non-ASCII, bytes, int, float), and refuses what it would not send."""
    from redis.asyncio.connection import Connection

    from sidecar.ratelimit import resp

    args = ("EVALSHA", "a" * 40, 2, "kernelgate:rl:t:acmé:requests", b'{"id": "x"}', 0, -3, 2**70, 1.5, 0.1, 1e20,
            repr(3600 * 1e6), "")
    assert resp.command(*args) == b"".join(Connection().pack_command(*args))
    with pytest.raises(TypeError):
        resp.command(True)
