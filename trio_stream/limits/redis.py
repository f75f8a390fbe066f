"""The Redis backend of the limits: exact across every node (cluster mode).

Every decision is one Lua script, so it is atomic across the cluster, and
each script reads Redis's own clock (``TIME``): the nodes' clocks never
enter a window.  What lives in Redis (``prefix`` = ``ts:``), per key name::

    ts:k:{name}:rq          hash   bucket index -> requests admitted in it
    ts:k:{name}:tk          hash   bucket index -> tokens charged in it
    ts:k:{name}:st          zset   stream slot id -> its lease's expiry (TIME)
    ts:k:{name}:b:{period}  string tokens charged in a UTC day (YYYY-MM-DD)
                                   or month (YYYY-MM)
    ts:k:{name}:u:{day}     hash   "{model}\\n{r|p|c}" -> requests, prompt and
                                   completion tokens of that day

Buckets older than the window are deleted by the script that next reads the
hash; every key expires by itself once unused.

Failure modes:

* **Redis is unreachable.**  A call fails with :class:`LimitsUnavailable` at
  once when the connection is refused, and after :data:`CALL_TIMEOUT` when
  Redis does not answer.  Nothing is retried here: ``limits_on_outage``
  (the HTTP layer) decides whether the request is refused or admitted.
* **A node dies holding stream slots.**  Each slot is a lease renewed by its
  node every :data:`SLOT_RENEW`; the admission script drops expired ones, so
  a dead node's slots are free after at most :data:`SLOT_LEASE`.
* **A charge does not land** (Redis down while a stream runs or ends).  The
  caller (:class:`~trio_stream.limits.meter.Charger`) keeps it pending and
  sends it again once Redis answers.  A charge whose script landed but whose
  answer was lost is sent again too: a key may be over-charged by it, never
  under-charged.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable
from typing import Any, TypeVar

import coredis
import coredis.exceptions
import trio

from ..shared.redis_conn import redis_client
from .base import (
    BUCKETS,
    CALL_TIMEOUT,
    SLOT_LEASE,
    SLOT_RENEW,
    USAGE_DAYS,
    Limiter,
    Limits,
    LimitsUnavailable,
    UsageRow,
    Verdict,
    Window,
)

T = TypeVar("T")

_PRELUDE = f"""
local BUCKETS = {BUCKETS}
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000, tonumber(t[1])
end
-- days since 1970-01-01 -> the UTC date (H. Hinnant's civil_from_days)
local function day_of(secs)
  local z = math.floor(secs / 86400) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
                          - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp + 3
  if mp >= 10 then m = mp - 9 end
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d-%02d', y, m, d)
end
-- the window's buckets, oldest first; older ones are deleted
local function live(key, current)
  local all = redis.call('HGETALL', key)
  local items = {{}}
  for i = 1, #all, 2 do
    local idx = tonumber(all[i])
    if idx < current - (BUCKETS - 1) then
      redis.call('HDEL', key, all[i])
    else
      table.insert(items, {{idx, tonumber(all[i + 1])}})
    end
  end
  table.sort(items, function(a, b) return a[1] < b[1] end)
  return items
end
"""

# KEYS: rq, tk, st, budget prefix.  ARGV: bucket, rpm, tpm, max_streams,
# per day, per month (-1: none), slot, counting (1/0), slot lease, ttl ms.
_ADMIT = (
    _PRELUDE
    + """
local now, secs = clock()
local bucket = tonumber(ARGV[1])
local current = math.floor(now / bucket)
local rpm, tpm, maxs = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local pday, pmonth = tonumber(ARGV[5]), tonumber(ARGV[6])
local function window(items, limit, add)
  local total = 0
  for _, it in ipairs(items) do total = total + it[2] end
  local retry = 0
  if total >= limit then
    local left = total
    for _, it in ipairs(items) do
      left = left - it[2]
      if left < limit then retry = (it[1] + BUCKETS) * bucket - now; break end
    end
  end
  local newest = nil
  for _, it in ipairs(items) do if it[2] ~= 0 then newest = it[1] end end
  if add > 0 then total = total + add; newest = current end
  local reset = 0
  if newest then reset = math.max(0, (newest + BUCKETS) * bucket - now) end
  return math.max(0, limit - total), reset, math.max(0, retry)
end
local rq_items = live(KEYS[1], current)
local tk_items = live(KEYS[2], current)
local rq_rem, rq_reset, rq_retry, tk_rem, tk_reset, tk_retry = 0, 0, 0, 0, 0, 0
if rpm >= 0 then rq_rem, rq_reset, rq_retry = window(rq_items, rpm, 0) end
if tpm >= 0 then tk_rem, tk_reset, tk_retry = window(tk_items, tpm, 0) end
local day = day_of(secs)
local function spent(period) return tonumber(redis.call('GET', KEYS[4] .. period) or '0') end
local refused, retry = '', 0
if (pday >= 0 and spent(day) >= pday)
   or (pmonth >= 0 and spent(string.sub(day, 1, 7)) >= pmonth) then
  refused = 'budget'
elseif rq_retry > 0 then
  refused, retry = 'requests', rq_retry
elseif tk_retry > 0 then
  refused, retry = 'tokens', tk_retry
elseif maxs >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= maxs then refused = 'streams' end
end
if refused == '' and ARGV[8] == '1' then
  if rpm >= 0 then rq_rem, rq_reset = window(rq_items, rpm, 1) end
  redis.call('HINCRBY', KEYS[1], tostring(current), 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[10])
  if maxs >= 0 then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[9]), ARGV[7])
    redis.call('PEXPIRE', KEYS[3], math.ceil(tonumber(ARGV[9]) * 1000))
  end
end
local function f(x) return string.format('%.6f', x) end
return {refused, f(retry), rq_rem, f(rq_reset), tk_rem, f(tk_reset)}
"""
)

# KEYS: tk, budget prefix, usage prefix.  ARGV: bucket, model, prompt,
# completion, requests, ttl ms, usage ttl s.
_CHARGE = (
    _PRELUDE
    + """
local now, secs = clock()
local current = math.floor(now / tonumber(ARGV[1]))
local prompt, completion = tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens = prompt + completion
live(KEYS[1], current)
redis.call('HINCRBY', KEYS[1], tostring(current), tokens)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
local day = day_of(secs)
redis.call('INCRBY', KEYS[2] .. day, tokens)
redis.call('EXPIRE', KEYS[2] .. day, 2 * 86400)
redis.call('INCRBY', KEYS[2] .. string.sub(day, 1, 7), tokens)
redis.call('EXPIRE', KEYS[2] .. string.sub(day, 1, 7), 32 * 86400)
local u = KEYS[3] .. day
redis.call('HINCRBY', u, ARGV[2] .. '\\n' .. 'r', ARGV[5])
redis.call('HINCRBY', u, ARGV[2] .. '\\n' .. 'p', prompt)
redis.call('HINCRBY', u, ARGV[2] .. '\\n' .. 'c', completion)
redis.call('EXPIRE', u, ARGV[7])
return 1
"""
)

# KEYS: the slot zsets.  ARGV: lease, then the slots (one per key).
_RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', expiry, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], math.ceil(tonumber(ARGV[1]) * 1000))
end
return 1
"""

# KEYS: usage prefix.  ARGV: days.  Returns day, field, value, ... newest first.
_USAGE = (
    _PRELUDE
    + """
local _, secs = clock()
local out = {}
for i = 0, tonumber(ARGV[1]) - 1 do
  local day = day_of(secs - i * 86400)
  local all = redis.call('HGETALL', KEYS[1] .. day)
  for j = 1, #all, 2 do
    table.insert(out, day); table.insert(out, all[j]); table.insert(out, all[j + 1])
  end
end
return out
"""
)


def _limit(value: int | None) -> str:
    return "-1" if value is None else str(value)


class RedisLimiter(Limiter):
    """The limits in Redis (or Valkey), through coredis, as the shared state."""

    def __init__(self, url: str, window: float = 60.0, *, prefix: str = "ts:") -> None:
        super().__init__(window)
        self.prefix = prefix
        self.client = redis_client(url, max_idle_time=10)
        self._admit = self.client.register_script(_ADMIT)
        self._charge = self.client.register_script(_CHARGE)
        self._usage = self.client.register_script(_USAGE)
        self._renew_script = self.client.register_script(_RENEW)
        self._held: dict[str, str] = {}  # slot -> key name: this node's leases
        self._ttl_ms = str(math.ceil(window * 1000) + 1000)

    def _k(self, name: str, part: str) -> str:
        return f"{self.prefix}k:{name}:{part}"

    async def _call(self, step: Awaitable[T]) -> T:
        """One Redis step; any failure to reach Redis is LimitsUnavailable."""
        try:
            with trio.fail_after(CALL_TIMEOUT):
                return await step
        except (TimeoutError, trio.TooSlowError) as exc:
            raise LimitsUnavailable("redis: timeout") from exc
        except (coredis.exceptions.RedisError, OSError) as exc:
            raise LimitsUnavailable(f"redis: {type(exc).__name__}") from exc

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the client and renew this node's stream slots until cancelled.

        Cancellation: a ``Cancelled`` stops the renewals and closes the
        client; the slots still held expire after :data:`SLOT_LEASE`.
        """
        async with self.client:
            task_status.started()
            while True:
                await trio.sleep(SLOT_RENEW)
                try:
                    await self._renew()
                except LimitsUnavailable:
                    continue  # the next round tries again; a lease outlives 2 misses

    async def _renew(self) -> None:
        held = list(self._held.items())
        if not held:
            return
        keys = [self._k(name, "st") for _, name in held]
        await self._call(
            self._renew_script(keys=keys, args=[repr(SLOT_LEASE)] + [s for s, _ in held])
        )

    async def _decide(self, name: str, limits: Limits, slot: str, counting: bool) -> Verdict:
        keys = [self._k(name, "rq"), self._k(name, "tk"), self._k(name, "st"), self._k(name, "b:")]
        args = [
            repr(self.bucket), _limit(limits.rpm), _limit(limits.tpm),
            _limit(limits.max_streams), _limit(limits.tokens_per_day),
            _limit(limits.tokens_per_month), slot, "1" if counting else "0",
            repr(SLOT_LEASE), self._ttl_ms,
        ]  # fmt: skip
        raw: list[Any] = await self._call(self._admit(keys=keys, args=args))
        refused, retry, rq_rem, rq_reset, tk_rem, tk_reset = raw
        rq = tk = None
        if limits.rpm is not None:
            rq = Window(limits.rpm, int(rq_rem), float(rq_reset))
        if limits.tpm is not None:
            tk = Window(limits.tpm, int(tk_rem), float(tk_reset))
        return Verdict(refused or None, float(retry), rq, tk)

    async def admit(self, name: str, limits: Limits, slot: str) -> Verdict:
        """Cancellation: a checkpoint; one script, run or not.  A ``Cancelled``
        after it ran leaves the slot held until the caller's :meth:`release`;
        :class:`LimitsUnavailable` leaves none renewed (a slot the script took
        all the same expires after :data:`SLOT_LEASE`)."""
        if limits.max_streams is not None:
            self._held[slot] = name  # renewed from now on, released by the caller
        try:
            verdict = await self._decide(name, limits, slot, True)
        except LimitsUnavailable:
            # No answer: the caller holds nothing.  Were the slot taken all the
            # same, it is no longer renewed and expires after SLOT_LEASE.
            self._held.pop(slot, None)
            raise
        if not verdict.admitted:
            self._held.pop(slot, None)
        return verdict

    async def release(self, name: str, slot: str) -> None:
        """Cancellation: a checkpoint; a ``Cancelled`` leaves the slot to expire."""
        if self._held.pop(slot, None) is None:
            return
        await self._call(self.client.zrem(self._k(name, "st"), [slot]))

    async def charge(
        self, name: str, model: str, prompt: int, completion: int, *, requests: int = 0
    ) -> None:
        """Cancellation: a checkpoint; one script, run or not."""
        keys = [self._k(name, "tk"), self._k(name, "b:"), self._k(name, "u:")]
        args = [
            repr(self.bucket), model, str(prompt), str(completion), str(requests),
            self._ttl_ms, str((USAGE_DAYS + 1) * 86400),
        ]  # fmt: skip
        await self._call(self._charge(keys=keys, args=args))

    async def peek(self, name: str, limits: Limits) -> Verdict:
        """Cancellation: a checkpoint; a read (it only drops expired buckets)."""
        return await self._decide(name, limits, "", False)

    async def usage(self, name: str) -> list[UsageRow]:
        """Cancellation: a checkpoint; a read."""
        flat: list[str] = await self._call(
            self._usage(keys=[self._k(name, "u:")], args=[str(USAGE_DAYS)])
        )
        rows: dict[tuple[str, str], list[int]] = {}
        for i in range(0, len(flat), 3):
            day, field, value = flat[i : i + 3]
            model, _, kind = field.rpartition("\n")
            counts = rows.setdefault((day, model), [0, 0, 0])
            counts["rpc".index(kind)] = int(value)
        ordered = sorted(rows.items(), key=lambda r: r[0][1])  # models A-Z ...
        ordered.sort(key=lambda r: r[0][0], reverse=True)  # ... within days, newest first
        return [UsageRow(day, model, *counts) for (day, model), counts in ordered]
