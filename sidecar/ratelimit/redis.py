"""Budgets in Redis, shared by every sidecar replica.

One Lua script checks every budget and only then commits all of them, so a request is
charged atomically across replicas, and it reads Redis's own clock (TIME), so replicas with
skewed clocks agree. TATs are stored in microseconds; each key expires when its budget is
full again (at most one period), so idle keys vanish. The script is loaded once and run by
SHA (redis-py's Script reloads it after a Redis restart).

Reservations: ``RESERVE_SCRIPT`` is the charge plus, in the same atomic step, a slot in each
concurrency sorted set (member: the reservation id, score: its expiry; expired members are
dropped before counting, so a lost reservation frees its slot on its own), the reservation's
record (JSON, kept ``ttl`` + 60 s) and its entry in the expiry index. ``CLAIM_SCRIPT`` deletes
the record and frees its slots and returns it once; a second claim finds nothing. The scripts
touch keys they read from the record, so they need a single Redis (not Redis Cluster).

Any Redis error or a reply slower than ``timeout_s`` raises BackendUnavailable. After a
timeout the script may still have run in Redis; the caller's fallback then charges the
request locally too, erring on the side of counting it twice rather than not at all.

Charges and reservations of concurrent checks share round trips (as envoyproxy/ratelimit
pipelines): every reserve that arrives while the event loop is busy with one turn is queued,
and the queue goes to Redis as one pipeline (EVALSHA per check, no MULTI: each script is
atomic on its own) at the start of the next turn. Under load a round trip carries as many
checks as arrived meanwhile; an idle sidecar sends each one as it comes. Those pipelines go over
one lean connection (``resp.RespPipe``: the EVALSHA encoded here, replies parsed by hiredis),
redis-py's pipeline costing ~100 µs of CPU a check; claims, adjustments and script loading
stay on redis-py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from common import strict_json
from sidecar.ratelimit.base import BackendUnavailable, Budget, BudgetState, Claimed, RateLimitResult, Reservation
from sidecar.ratelimit.gcra import SLACK_UNITS
from sidecar.ratelimit.resp import RespPipe, pack_command
from sidecar.ratelimit.settle import settle

# KEYS: budget keys, then concurrency slot keys, then (when reserving) the record and the expiry
# index. ARGV: slack in units of T, #budgets, #slots, ttl (us), reservation id ("" = a plain charge:
# no record), record JSON, then limit, period (us), cost per budget, then the limit per slot.
# Returns {allowed (1/0), stored debt in us of each budget as a string, in-flight count per slot}.
# Same decision as gcra.decide + settle.settle, relative to Redis's TIME.
RESERVE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local slack = tonumber(ARGV[1])
local nb = tonumber(ARGV[2])
local ns = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local rid = ARGV[5]
local record = ARGV[6]
local pending = {}
local debts = {}
local counts = {}
local allowed = 1
for i = 1, nb do
  local key = KEYS[i]
  local limit = tonumber(ARGV[6 + 3 * i - 2])
  local period = tonumber(ARGV[6 + 3 * i - 1])
  local cost = tonumber(ARGV[6 + 3 * i])
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
for j = 1, ns do
  local key = KEYS[nb + j]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local n = redis.call('ZCARD', key)
  counts[j] = n
  if n >= tonumber(ARGV[6 + 3 * nb + j]) then allowed = 0 end
end
if allowed == 1 then
  for key, debt in pairs(pending) do
    if debt > 0 then
      redis.call('SET', key, string.format('%.17g', now + debt), 'PX', math.max(1, math.ceil(debt / 1000)))
    end
  end
  if rid ~= '' then
    local ttl_ms = math.ceil(ttl / 1000)
    for j = 1, ns do
      redis.call('ZADD', KEYS[nb + j], now + ttl, rid)
      redis.call('PEXPIRE', KEYS[nb + j], ttl_ms + 1000)
    end
    redis.call('SET', KEYS[nb + ns + 1], record, 'PX', ttl_ms + 60000)
    redis.call('ZADD', KEYS[nb + ns + 2], now + ttl, rid)
  end
end
local out = {allowed}
for i = 1, nb do out[#out + 1] = debts[i] end
for j = 1, ns do out[#out + 1] = counts[j] end
return out
"""

# KEYS[1]: the record, KEYS[2]: the expiry index; ARGV[1]: the reservation id.
CLAIM_SCRIPT = """
local record = redis.call('GET', KEYS[1])
if not record then return false end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
for _, key in ipairs(cjson.decode(record)['slots']) do redis.call('ZREM', key, ARGV[1]) end
return record
"""

# KEYS[1]: the expiry index; ARGV[1]: the record key prefix, ARGV[2]: how many at most.
CLAIM_EXPIRED_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))) do
  redis.call('ZREM', KEYS[1], rid)
  local key = ARGV[1] .. rid
  local record = redis.call('GET', key)
  if record then
    redis.call('DEL', key)
    for _, slot in ipairs(cjson.decode(record)['slots']) do redis.call('ZREM', slot, rid) end
    out[#out + 1] = record
  end
end
return out
"""

# KEYS: budget keys; ARGV[1]: delta (units); then limit, period (us) per key. Same as gcra.adjust.
ADJUST_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local delta = tonumber(ARGV[1])
local debts = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local interval = tonumber(ARGV[2 * i + 1]) / tonumber(ARGV[2 * i])
  local stored = tonumber(redis.call('GET', key))
  local base = now
  if stored and stored > now then base = stored end
  local tat = base + delta * interval
  if tat > now then
    redis.call('SET', key, string.format('%.17g', tat), 'PX', math.max(1, math.ceil((tat - now) / 1000)))
    debts[i] = string.format('%.17g', tat - now)
  else
    redis.call('DEL', key)
    debts[i] = '0'
  end
end
return debts
"""

EXPIRED_BATCH = 500


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
        self._reserve = self._client.register_script(RESERVE_SCRIPT)
        self._claim = self._client.register_script(CLAIM_SCRIPT)
        self._claim_expired = self._client.register_script(CLAIM_EXPIRED_SCRIPT)
        self._adjust = self._client.register_script(ADJUST_SCRIPT)
        self._records = key_prefix + "res:"
        self._index = key_prefix + "res:index"
        # reserve calls waiting for the next pipeline: (keys, args, future of the reply)
        self._queued: list[tuple[list[str], list[Any], asyncio.Future]] = []
        self._sending: set[asyncio.Task] = set()  # batches on the slow path (_send)
        self._written: list[list[Any]] = []  # batches written on the lean connection, unanswered
        self._pipe = RespPipe(self._client, timeout_s) if RespPipe.supports(self._client) else None

    async def charge(self, budgets: Sequence[Budget]) -> RateLimitResult:
        """A reservation that is never claimed: the same script, with no record and no slots."""
        if not budgets:
            return RateLimitResult(True, (), self.backend)
        return await self.reserve(Reservation("", "", tuple(budgets)))

    async def reserve(self, reservation: Reservation) -> RateLimitResult:
        budgets, slots = reservation.budgets, reservation.slots
        keys = [self._key_prefix + b.key for b in budgets] + [self._key_prefix + s.key for s in slots]
        if reservation.reservation_id:
            keys += [self._records + reservation.reservation_id, self._index]
        # the record is only stored for a reservation (a plain charge passes "")
        record = strict_json.dumps({**_record_fields(reservation), "slots": keys[len(budgets):len(budgets) + len(slots)]}
                                   ) if reservation.reservation_id else b""
        args: list[str | int] = [repr(SLACK_UNITS), len(budgets), len(slots), repr(reservation.ttl_s * 1e6),
                                 reservation.reservation_id, record]
        for b in budgets:
            args += [b.limit, repr(b.period_s * 1e6), b.cost]
        args += [s.limit for s in slots]
        reply = await self._queue(keys, args)
        allowed = reply[0] == 1
        debts = {b.key: float(d) / 1e6 for b, d in zip(budgets, reply[1:1 + len(budgets)])}
        charged = settle(0.0, budgets, debts.__getitem__)
        # denied for a slot alone: nothing was charged, show the budgets uncharged
        states = (charged.states if allowed or not charged.allowed
                  else settle(0.0, [_uncharged(b) for b in budgets], debts.__getitem__).states)
        counts = [int(c) for c in reply[1 + len(budgets):]]
        slot_states = tuple(BudgetState(s.key, "concurrency", s.limit, max(0, s.limit - n - (1 if allowed else 0)),
                                        0.0, 1.0 if not allowed and n >= s.limit else 0.0)
                            for s, n in zip(slots, counts))
        return RateLimitResult(allowed, states + slot_states, self.backend)

    async def claim(self, reservation_id: str) -> Claimed | None:
        record = await self._run(self._claim, [self._records + reservation_id, self._index], [reservation_id])
        return _claimed(reservation_id, record, self.backend) if record else None

    async def claim_expired(self) -> list[Claimed]:
        records = await self._run(self._claim_expired, [self._index], [self._records, EXPIRED_BATCH])
        out = []
        for raw in records:
            fields = json.loads(raw)
            out.append(_claimed(fields["id"], raw, self.backend))
        return out

    async def adjust(self, claimed: Claimed, delta: int) -> tuple[BudgetState, ...]:
        budgets = claimed.token_budgets
        args: list[str | int] = [delta]
        for b in budgets:
            args += [b.limit, repr(b.period_s * 1e6)]
        reply = await self._run(self._adjust, [self._key_prefix + b.key for b in budgets], args)
        debts = {b.key: float(d) / 1e6 for b, d in zip(budgets, reply)}
        return settle(0.0, [_uncharged(b) for b in budgets], debts.__getitem__).states

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:  # TimeoutError (the deadline) is an OSError
            raise BackendUnavailable(f"redis: {type(exc).__name__}") from exc

    async def _queue(self, keys: list[str], args: list[Any]) -> Any:
        """RESERVE_SCRIPT's reply, sent in the next pipeline (module docstring). Each batch has one
        deadline (``timeout_s`` from its flush): the reply or BackendUnavailable comes by then."""
        reply = asyncio.get_running_loop().create_future()
        self._queued.append((keys, args, reply))
        if len(self._queued) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        return await reply

    def _flush(self) -> None:
        """The queued batch to Redis: written at once on the lean connection when it is up (its
        replies delivered from the connection's data_received), else by a task that connects."""
        batch, self._queued = self._queued, []
        loop = asyncio.get_running_loop()
        protocol = self._pipe.connected() if self._pipe is not None else None
        if protocol is None:
            timer = loop.call_later(self._timeout_s, self._expire, batch, None)
            task = asyncio.ensure_future(self._send(batch, timer))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
            return
        timer = loop.call_later(self._timeout_s, self._expire, batch, protocol)
        self._written.append(batch)

        def done(replies: list[Any] | None, error: BaseException | None) -> None:
            self._written.remove(batch)
            if error is None and not any(isinstance(r, NoScriptError) for r in replies):
                timer.cancel()
                self._deliver(batch, replies)
                return
            if all(future.done() for _, _, future in batch):
                return  # its deadline passed (and aborted the connection): already answered 503, no retry
            # the connection was lost (Redis restarted?) or the script is gone: the slow path
            # retries once on a new connection / loads the script, within the same deadline
            task = asyncio.ensure_future(self._send(batch, timer, replies, retried=error is not None))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

        self._pipe.write(protocol, self._payload(batch), len(batch), done)

    def _expire(self, batch: list[tuple[list[str], list[Any], asyncio.Future]], protocol: Any) -> None:
        """The batch's deadline: whatever is unanswered gets BackendUnavailable; a silent Redis's
        connection is dropped (its replies, if late, must not be waited for)."""
        if protocol is not None and any(not future.done() for _, _, future in batch):
            self._pipe.abort(protocol)
        self._deliver(batch, [TimeoutError()] * len(batch))

    @staticmethod
    def _deliver(batch: list[tuple[list[str], list[Any], asyncio.Future]], replies: list[Any]) -> None:
        for (_, _, future), reply in zip(batch, replies):
            if future.done():
                continue
            if isinstance(reply, BaseException):
                future.set_exception(BackendUnavailable(f"redis: {type(reply).__name__}"))
            else:
                future.set_result(reply)

    async def _send(self, batch: list[tuple[list[str], list[Any], asyncio.Future]], timer: asyncio.TimerHandle,
                    replies: list[Any] | None = None, retried: bool = False) -> None:
        """The slow path: connect, write (once more after a lost connection), load a missing script.
        ``replies``: what the lean connection already answered (NOSCRIPT among them)."""
        try:
            if replies is None:
                replies = await (self._pipelined(batch, retry=not retried) if self._pipe is not None
                                 else self._pipelined_redis_py(batch))
            for i, reply in enumerate(replies):
                if isinstance(reply, NoScriptError):  # Redis restarted: load it once, run again
                    keys, args, _ = batch[i]
                    replies[i] = await self._reserve(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            replies = [exc] * len(batch)
        timer.cancel()
        self._deliver(batch, replies)

    def _payload(self, batch: list[tuple[list[str], list[Any], asyncio.Future]]) -> bytes:
        sha = self._reserve.sha
        return b"".join([pack_command(("EVALSHA", sha, len(keys), *keys, *args)) for keys, args, _ in batch])

    async def _pipelined(self, batch: list[tuple[list[str], list[Any], asyncio.Future]],
                         retry: bool = True) -> list[Any]:
        """The batch's replies over the lean connection (NOSCRIPT comes back as a NoScriptError)."""
        payload = self._payload(batch)
        try:
            return await self._pipe.send(payload, len(batch))
        except RedisConnectionError:  # a connection Redis closed (restart): once more, on a new one
            if not retry:
                raise
            return await self._pipe.send(payload, len(batch))

    async def _pipelined_redis_py(self, batch: list[tuple[list[str], list[Any], asyncio.Future]]) -> list[Any]:
        """The same through redis-py (a TLS or Unix-socket URL)."""
        if len(batch) == 1:
            keys, args, _ = batch[0]
            return [await self._reserve(keys=keys, args=args)]
        pipe = self._client.pipeline(transaction=False)
        for keys, args, _ in batch:
            pipe.evalsha(self._reserve.sha, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)

    async def close(self) -> None:
        if self._written:  # answered, or failed by their deadline, within timeout_s
            await asyncio.wait({future for batch in self._written for _, _, future in batch}, timeout=self._timeout_s)
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=self._timeout_s)
        if self._pipe is not None:
            self._pipe.close()
        await self._client.aclose()


def _uncharged(budget: Budget) -> Budget:
    return Budget(budget.key, budget.limit, budget.period_s, 0, budget.kind)


def _record_fields(reservation: Reservation) -> dict[str, Any]:
    return {"id": reservation.reservation_id, "tenant": reservation.tenant,
            "budgets": [[b.key, b.limit, b.period_s, b.cost] for b in reservation.budgets if b.kind == "tokens"],
            "reserved": reservation.reserved_cost, "wi": reservation.input_weight, "wo": reservation.output_weight}


def _claimed(reservation_id: str, raw: bytes | str, backend: str) -> Claimed:
    fields = json.loads(raw)
    return Claimed(reservation_id, fields["tenant"],
                   tuple(Budget(k, limit, period, cost, "tokens") for k, limit, period, cost in fields["budgets"]),
                   fields["reserved"], fields["wi"], fields["wo"], backend)
