"""Budgets in Redis, shared by every sidecar replica.

One Lua script checks every budget and only then commits all of them, so a request is
charged atomically across replicas, and it reads Redis's own clock (TIME), so replicas with
skewed clocks agree. TATs are stored in microseconds; each key expires when its budget is
full again (at most one period), so idle keys vanish. The script is loaded once and run by
SHA (redis-py's Script reloads it after a Redis restart).

Any Redis error or a reply slower than ``timeout_s`` raises BackendUnavailable. After a
timeout the script may still have run in Redis; the caller's fallback then charges the
request locally too, erring on the side of counting it twice rather than not at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from sidecar.ratelimit.base import BackendUnavailable, Budget, RateLimitResult
from sidecar.ratelimit.gcra import SLACK_UNITS
from sidecar.ratelimit.settle import settle

# KEYS: budget keys. ARGV[1]: slack in units of T; then limit, period (us), cost per key.
# Returns {allowed (1/0), stored debt in us of each key as a string}.
# Same decision as gcra.decide + settle.settle, relative to Redis's TIME.
CHARGE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local slack = tonumber(ARGV[1])
local pending = {}
local debts = {}
local allowed = 1
for i = 1, #KEYS do
  local key = KEYS[i]
  local limit = tonumber(ARGV[3 * i - 1])
  local period = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])
  local stored = tonumber(redis.call('GET', key))
  local stored_debt = 0
  if stored and stored > now then stored_debt = stored - now end
  debts[i] = string.format('%.17g', stored_debt)
  local debt = pending[key] or stored_debt
  local interval = period / limit
  local new_debt = debt + cost * interval
  if cost <= limit and new_debt <= period + slack * interval then
    pending[key] = new_debt
  else
    allowed = 0
  end
end
if allowed == 1 then
  for key, debt in pairs(pending) do
    if debt > 0 then
      redis.call('SET', key, string.format('%.17g', now + debt), 'PX', math.max(1, math.ceil(debt / 1000)))
    end
  end
end
local out = {allowed}
for i = 1, #debts do out[i + 1] = debts[i] end
return out
"""


class RedisRateLimiter:
    backend = "redis"

    def __init__(self, url: str, timeout_s: float = 0.05, key_prefix: str = "kernelgate:rl:") -> None:
        self._timeout_s = timeout_s
        self._key_prefix = key_prefix
        # One immediate retry: the first command after a Redis restart meets a dead pooled
        # connection; the retry reconnects. The deadline in charge() bounds the total.
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1), health_check_interval=0,
        )
        self._script = self._client.register_script(CHARGE_SCRIPT)

    async def charge(self, budgets: Sequence[Budget]) -> RateLimitResult:
        if not budgets:
            return RateLimitResult(True, (), self.backend)
        keys = [self._key_prefix + b.key for b in budgets]
        args: list[str | int] = [repr(SLACK_UNITS)]
        for b in budgets:
            args += [b.limit, repr(b.period_s * 1e6), b.cost]
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await self._script(keys=keys, args=args)
        except (RedisError, OSError) as exc:  # TimeoutError (the deadline) is an OSError
            raise BackendUnavailable(f"redis: {type(exc).__name__}") from exc
        lua_allowed = reply[0] == 1
        debts = {b.key: float(d) / 1e6 for b, d in zip(budgets, reply[1:])}
        # The script decided and committed; settle() at "now = 0" turns the debts it saw
        # into the same states the memory backend reports.
        result = settle(0.0, budgets, debts.__getitem__)
        return RateLimitResult(lua_allowed, result.states, self.backend)

    async def close(self) -> None:
        await self._client.aclose()
