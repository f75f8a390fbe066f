"""The Redis backend of the shared state: cluster mode (``--redis URL``).

Every worker of every node gives the same ``--redis``; each process is one
*node* here, with a random id.  What lives in Redis (``prefix`` = ``ts:``)::

    ts:s:{tenant}:{session}  hash   epoch, cur, r:{run} = 0 | 1 (fenced)
    ts:r:{run}               hash   tenant, session, node, detached, status, ...
    ts:c:{run}               string a cancel request (its reason), polled
    ts:l:{run}               stream a detached run's log: id {seq}-0 per entry,
                                    {last}-1 for its end
    ts:n:{node}              string the node's lease (expires after --node-lease)
    ts:nr:{node}             set    the runs the node owns
    ts:nodes                 set    the nodes that may own runs
    ts:cool:{member}         string an upstream member's cooldown (expires with it)
    channels ts:cancel:{node} (cancel requests), ts:finished (cleanups done)

Failure modes, and the rule that makes each safe:

* **A pub/sub message is lost** (delivered only to a subscribed connection:
  the listener's may be reconnecting).  Cancel requests are also written as
  ``ts:c:{run}``, and "finished" is also the run hash's ``status``: the
  listener re-reads both each time it has subscribed again
  (:meth:`RedisState._catch_up`), and besides the owner polls the flags every
  :data:`CANCEL_POLL` and a waiter the status every :data:`FINISH_POLL`.  The
  listener's connection is its own, never closed for idleness
  (:mod:`.redis_conn`).
* **A straggler outlives its supersede deadline** (a slow or partitioned
  node).  The claim script bumps the session's *epoch* and the straggler is
  fenced (``r:{run}`` = 1): its release is compare-and-delete by its own id, so
  it can never remove or overwrite its successor's entry, its save is keyed by
  its own run id (the store's primary key refuses a second row), and it is
  never anybody's predecessor again.  Its log stream is its own key.
* **A node dies** (kill -9).  Its lease key expires; the surviving node that
  sets its takeover lock (``SET NX`` with an expiry: one at a time, and
  another one again if that survivor fails midway) ends each of its runs
  ``failed``/``node_lost``, saves each detached
  run's partial from its shared log (the primary key makes a second save a
  no-op), appends the end to the log so followers get the error event, and
  releases the session.  An attached run's text never left its node: it is
  ended and released, with nothing to save.
* **A lease expires under a live node** (a pause longer than the lease).  Its
  runs are ended as above; when the node comes back its own saves are refused
  by the primary key (``save_duplicate_refused``) and its releases remove
  nothing that is not theirs.  Exactly once holds; the saved text is the
  partial.
* **Redis is unreachable.**  A refused or broken connection fails the call
  at once and turns ``healthy`` False; so does a heartbeat (at most every
  :data:`HEARTBEAT`) that gets no answer within :data:`CALL_TIMEOUT`.  While
  not healthy, new streams get 503 at once, without a call.  A call that only
  took too long fails (503) without that verdict: on a saturated node it is
  the node's own loop that is slow.  Runs in flight go on from their upstream
  and are saved (their shared-state steps are logged ``redis_unavailable``
  and kept for later).  When Redis answers again -- restarted empty, or with its data --
  the node puts its live runs back (records, sessions), does the cleanup
  steps of ended runs it missed (releases, ends), and only then reports
  healthy.  Each detached log goes on from wherever Redis has it (from its
  first entry after a restart): entries are only ever appended right after
  the log's last one, so a log never has a gap.
* **A retried write already landed.**  Every write is idempotent: hash sets,
  ``SET NX`` of a cancel, compare-and-delete, and log appends that check the
  log's last entry first.
"""

from __future__ import annotations

import collections
import contextlib
import math
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

import coredis
import coredis.exceptions
import orjson
import trio
from coredis.tokens import PureToken

from ..core.log import Chunk, Entry, Outcome, RunStatus
from .base import (
    Claim,
    LogPage,
    RunRecord,
    RunView,
    SessionKey,
    SharedState,
    SharedUnavailable,
)
from .redis_conn import CALL_TIMEOUT, listen, redis_client

T = TypeVar("T")

CANCEL_POLL = 0.25  # how often a node looks for cancel requests it missed
FINISH_POLL = 0.05  # how often a superseding request looks at its predecessors
HEARTBEAT = 1.0  # at most this long between two lease renewals (health probes)
TAKEOVER_HOLD = 5.0  # at least this long a survivor holds a dead node's takeover
FOLLOW_BLOCK_MS = 300  # XREAD BLOCK of a remote follower (below CALL_TIMEOUT)

_CLAIM = """
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local all = redis.call('HGETALL', KEYS[1])
local preds = {}
for i = 1, #all, 2 do
  if string.sub(all[i], 1, 2) == 'r:' and all[i + 1] == '0' then
    table.insert(preds, string.sub(all[i], 3))
  end
end
redis.call('HSET', KEYS[1], 'cur', ARGV[1], 'r:' .. ARGV[1], '0')
return {epoch, preds}
"""

#: Cool a member down for ARGV[1] ms, unless it already is for longer.
_COOL = """
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], '1', 'PX', ARGV[1]) end
return left
"""

_RELEASE = """
local was = redis.call('HGET', KEYS[1], 'r:' .. ARGV[1])
redis.call('HDEL', KEYS[1], 'r:' .. ARGV[1])
if redis.call('HGET', KEYS[1], 'cur') == ARGV[1] then redis.call('HDEL', KEYS[1], 'cur') end
local left = 0
for _, k in ipairs(redis.call('HKEYS', KEYS[1])) do
  if k == 'cur' or string.sub(k, 1, 2) == 'r:' then left = left + 1 end
end
if left == 0 then redis.call('DEL', KEYS[1]) end
if was == '1' then return 1 end
return 0
"""

_FENCE = """
if redis.call('HEXISTS', KEYS[1], 'r:' .. ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'r:' .. ARGV[1], '1')
  return 1
end
return 0
"""

# After an outage, put a live run back into its session (a restarted Redis
# lost it): its entry, and -- unless the run has ended (ARGV[2] = '0') or
# another run has claimed the session since -- the session's current run, with
# an epoch no lower than the run's own claim.
_RESTORE = """
redis.call('HSETNX', KEYS[1], 'r:' .. ARGV[1], '0')
if ARGV[2] == '1' and redis.call('HSETNX', KEYS[1], 'cur', ARGV[1]) == 1 then
  if tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0') < tonumber(ARGV[3]) then
    redis.call('HSET', KEYS[1], 'epoch', ARGV[3])
  end
end
return 0
"""

# KEYS: a run's log; ARGV: the seq of the first entry, ttl, the end ('' if none), entries.
# The log is its own shipping cursor: the entries (then the end) are appended
# only right after the log's last entry; otherwise nothing is written and the
# log's last seq is returned, for the shipper to go on from there.  So a log
# lost with a restarted Redis is shipped again from its first entry, in order
# (an XADD below the log's top is refused: a later entry must never land
# first), and a batch that landed although its call failed is not sent twice.
# Returns -1 once the log has its end (appended now or before), else its last seq.
_APPEND = """
local last = 0
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #top > 0 then
  local seq, part = string.match(top[1][1], '^(%d+)-(%d+)$')
  if part ~= '0' then return -1 end
  last = tonumber(seq)
end
local first = tonumber(ARGV[1])
if last ~= first - 1 then return last end
for i = 4, #ARGV do
  last = first + i - 4
  redis.call('XADD', KEYS[1], last .. '-0', 'e', ARGV[i])
end
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[1], last .. '-1', 'end', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return -1
end
return last
"""

# The node's lease and its membership of the node set.
# KEYS: ts:n:{node}, ts:nodes; ARGV: node, lease in ms
_BEAT = """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

# A run's record, and its place among its node's runs.
# KEYS: ts:r:{run}, ts:nr:{node}; ARGV: run id, then the record's fields and values
_REGISTER = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

# A run's end: its record's status (kept for the run ttl), out of its node's
# runs, and the "finished" notice.
# KEYS: ts:r:{run}, ts:nr:{node}; ARGV: status, reason, ttl, run id, channel
_END = """
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'reason', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('SREM', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[4])
return 1
"""

# KEYS: run hash, cancel flag; ARGV: reason, ttl, prefix, run id
_CANCEL = """
local node = redis.call('HGET', KEYS[1], 'node')
if not node then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2])
redis.call('PUBLISH', ARGV[3] .. 'cancel:' .. node, ARGV[4] .. '\\t' .. ARGV[1])
return 1
"""


def _entry_json(entry: Entry) -> bytes:
    """An entry as stored in a Redis log: a ``str`` as a JSON string, a
    :class:`Chunk` as ``{"c": body}`` (``"s": 1`` added for the shape chunk)."""
    if isinstance(entry, str):
        return orjson.dumps(entry)
    return orjson.dumps({"c": entry.body, "s": 1} if entry.shape else {"c": entry.body})


def _entry_of(raw: str) -> Entry:
    value = orjson.loads(raw)
    if isinstance(value, str):
        return value
    if "tool" in value:  # written by a node from before issue 20 (a bare delta)
        return Chunk.of(value["tool"])
    return Chunk(value["c"], bool(value.get("s")))


class _RedisBase(SharedState):
    """The connection, the scripts and the keys: what every part of
    :class:`RedisState` calls Redis through."""

    def __init__(
        self, url: str, *, lease: float = 10.0, ttl: float = 300.0, prefix: str = "ts:"
    ) -> None:
        self.node = "node_" + secrets.token_hex(6)
        self.url = url
        self.lease = lease
        self.ttl = max(1, int(ttl))
        self.prefix = prefix
        # A burst opens connections; idle ones close again, so an idle node
        # holds what its heartbeat uses (every lease / 3) and no more.
        self.client = redis_client(url, max_idle_time=max(1, math.ceil(lease)))
        self._claim = self.client.register_script(_CLAIM)
        self._release = self.client.register_script(_RELEASE)
        self._cool = self.client.register_script(_COOL)
        self._fence = self.client.register_script(_FENCE)
        self._cancel = self.client.register_script(_CANCEL)
        self._append = self.client.register_script(_APPEND)
        self._restore = self.client.register_script(_RESTORE)
        self._beat_script = self.client.register_script(_BEAT)
        self._register = self.client.register_script(_REGISTER)
        self._end = self.client.register_script(_END)
        self._healthy = True
        self._finished: dict[str, trio.Event] = {}
        self._waiters: collections.Counter[str] = collections.Counter()
        self._reship = trio.Event()
        self._resyncs = 0  # how many times Redis came back (its logs may be gone)
        self._missed: dict[str, Callable[[], Awaitable[Any]]] = {}  # see _cleanup_step
        self.caught_up = 0  # how many times the listener has (re)subscribed and caught up

    # -- keys -------------------------------------------------------------
    def _s(self, key: SessionKey) -> str:
        return f"{self.prefix}s:{key[0]}:{key[1]}"

    def _r(self, run_id: str) -> str:
        return f"{self.prefix}r:{run_id}"

    def _l(self, run_id: str) -> str:
        return f"{self.prefix}l:{run_id}"

    def _c(self, run_id: str) -> str:
        return f"{self.prefix}c:{run_id}"

    # -- calls ------------------------------------------------------------
    async def _call(self, step: Awaitable[T]) -> T:
        """One Redis step; any failure to reach Redis is SharedUnavailable."""
        try:
            with trio.fail_after(CALL_TIMEOUT):
                result = await step
        except (TimeoutError, trio.TooSlowError) as exc:  # slow: the heartbeat judges
            raise SharedUnavailable("redis: timeout") from exc
        except (coredis.exceptions.RedisError, OSError) as exc:  # refused, reset, ...
            self._healthy = False
            raise SharedUnavailable(f"redis: {type(exc).__name__}") from exc
        return result

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def _cleanup_step(self, name: str, step: Callable[[], Awaitable[T]]) -> T:
        """A step of a run's cleanup (its release, its end).  One that Redis
        missed -- it failed, or the caller's deadline cut it -- is kept and
        done again by :meth:`_resync` once Redis answers: otherwise a Redis
        that was only unreachable (not restarted) would keep the ended run as
        its session's run, and its record ``running``, for ever.  Every step is
        idempotent (compare-and-delete, hash sets)."""
        done = False
        try:
            result = await self._call(step())
            done = True
            return result
        finally:
            # Only a step that did not land is kept: one still in flight is
            # not redone by the heartbeat meanwhile.
            if done:
                self._missed.pop(name, None)
            else:
                self._missed[name] = step


class _RedisLogs(_RedisBase):
    """G7 in Redis: a detached run's log as the stream ``ts:l:{run}``, shipped
    by its owner and read by any node."""

    async def ship(self, run: RunView) -> None:
        """Copy ``run``'s log to ``ts:l:{run}`` in batches until its end is
        there.  The end is shipped after the run's cleanup, so a remote
        follower's ``[DONE]`` still means saved.  Retries while Redis is down.
        Each batch goes right after the log's last entry in Redis (``_APPEND``),
        so after an outage -- maybe a restart that lost the log -- shipping goes
        on from wherever the log in Redis is, from its first entry if need be.

        Cancellation: a checkpoint per batch and per wait; a ``Cancelled`` stops shipping, and
        the batches already appended stay (a later ship goes on from the log's top).
        """
        shipped, resyncs = 0, self._resyncs
        while True:
            reship = self._reship
            entries = run.log.read(shipped, 256)
            ending = run.done.is_set() and shipped + len(entries) == run.log.last_seq
            if not (entries or ending or resyncs != self._resyncs):
                await run.wait_changed()
                continue
            resyncs = self._resyncs
            outcome = run.log.outcome if ending else None
            tail = run.log.tail if ending else ()
            try:
                last = await self._append_log(run.id, shipped, entries, outcome, tail)
            except SharedUnavailable:
                with trio.move_on_after(0.2):
                    await reship.wait()
                resyncs = -1  # the log may be gone: ask Redis where it is
                continue
            if last < 0:
                return  # the log has its end
            shipped = last

    async def _append_log(
        self,
        run_id: str,
        shipped: int,
        entries: Sequence[Entry],
        outcome: Outcome | None,
        tail: Sequence[Chunk] = (),
    ) -> int:
        """Append ``entries`` (seqs from ``shipped + 1``), then the end if
        ``outcome`` (with the log's ``tail``: the chunks after the upstream's
        finish chunk), right after the log's last entry (``_APPEND``).
        Returns -1 once the log has its end, else its last seq."""
        end = b""
        if outcome is not None:
            fields: dict[str, Any] = {
                "status": outcome.status.value,
                "reason": outcome.reason,
                "message": outcome.message,
            }
            if outcome.error is not None:  # the upstream's own error, for followers' frames
                fields["error"] = outcome.error
            if tail:
                fields["tail"] = [chunk.body for chunk in tail]
            end = orjson.dumps(fields)
        args: list[str | bytes] = [str(shipped + 1), str(self.ttl), end, *map(_entry_json, entries)]
        raw: Any = await self._call(self._append(keys=[self._l(run_id)], args=args))
        return int(raw)

    async def write_end(self, run_id: str, last_seq: int, outcome: Outcome) -> None:
        """End the log after its entry ``last_seq`` (a no-op if that is not its top).

        Cancellation: one atomic script; a ``Cancelled`` leaves the end written or not.
        """
        await self._append_log(run_id, last_seq, (), outcome)

    async def read_log(self, run_id: str, cursor: int, *, wait: bool) -> LogPage:
        """Entries after ``cursor``, then the end if it is there; with ``wait``, block up to
        ``FOLLOW_BLOCK_MS`` for more.  Cancellation: a checkpoint; a ``Cancelled`` reads nothing
        and changes nothing.
        """
        key = self._l(run_id)
        after = f"{cursor}-0" if cursor else "0-0"
        if wait:
            found = await self._call(
                self.client.xread({key: after}, count=1024, block=FOLLOW_BLOCK_MS)
            )
            items = (found or {}).get(key, ())
        else:
            items = await self._call(self.client.xrange(key, f"({after}", "+"))
        entries: list[Entry] = []
        outcome: Outcome | None = None
        tail: tuple[Chunk, ...] = ()
        for item in items:
            values = item.field_values
            if "end" in values:
                end = orjson.loads(str(values["end"]))
                outcome = Outcome(
                    RunStatus(end["status"]), end["reason"], end["message"], end.get("error")
                )
                tail = tuple(Chunk(body) for body in end.get("tail", ()))
                break
            entries.append(_entry_of(str(values["e"])))
        return LogPage(entries, outcome, tail=tail)


class _RedisSessions(_RedisLogs):
    """G1-G5 in Redis: the session hash and its scripts, cancel requests, and
    waiting for other nodes' cleanups."""

    # -- sessions ---------------------------------------------------------
    async def claim(self, key: SessionKey, run_id: str) -> Claim:
        """One script (G1).  Cancellation: a checkpoint; the claim happened or did not."""
        raw: Any = await self._call(self._claim(keys=[self._s(key)], args=[run_id]))
        epoch, predecessors = raw
        return Claim(int(epoch), tuple(str(p) for p in predecessors))

    async def fence(self, key: SessionKey, run_id: str) -> None:
        """One script (G3).  Cancellation: a checkpoint; atomic."""
        await self._call(self._fence(keys=[self._s(key)], args=[run_id]))

    async def release(self, key: SessionKey, run_id: str) -> bool:
        """One script (G2), kept to be redone after an outage if it did not land.  Cancellation: a
        checkpoint; a release that a ``Cancelled`` cut is redone once Redis answers.
        """
        step = partial(self._release, keys=[self._s(key)], args=[run_id])
        raw: Any = await self._cleanup_step(f"release:{run_id}", step)
        return bool(raw)

    async def current(self, key: SessionKey) -> str | None:
        """Cancellation: a checkpoint; a read."""
        return await self._call(self.client.hget(self._s(key), "cur"))

    async def live(self, key: SessionKey) -> dict[str, bool]:
        """Cancellation: a checkpoint; a read."""
        fields = await self._call(self.client.hgetall(self._s(key)))
        return {k[2:]: v == "1" for k, v in fields.items() if k.startswith("r:")}

    # -- cancel and completion --------------------------------------------
    async def cancel(self, run_id: str, reason: str) -> None:
        """A local run is cancelled directly (no checkpoint); a remote one by one script.
        Cancellation: the cancel request is written or not.
        """
        if self.owner.cancel_local(run_id, reason):
            return
        args = [reason, str(self.ttl), self.prefix, run_id]
        await self._call(self._cancel(keys=[self._r(run_id), self._c(run_id)], args=args))

    async def wait_finished(self, run_ids: Sequence[str], grace: float) -> tuple[str, ...]:
        """G5.  Several requests may wait on one run at once (successors in
        quick succession): they share its event, which lives while any waits.

        Cancellation: a checkpoint while it waits; a ``Cancelled`` leaves nothing behind (its
        share of the events is given back).
        """
        waiting = {r: self._finished.setdefault(r, trio.Event()) for r in run_ids}
        self._waiters.update(run_ids)
        try:
            with trio.move_on_after(grace):
                while pending := [r for r, e in waiting.items() if not e.is_set()]:
                    await self._check_finished(pending, waiting)
                    if any(not waiting[r].is_set() for r in pending):
                        with trio.move_on_after(FINISH_POLL):
                            await waiting[pending[0]].wait()
            return tuple(r for r, e in waiting.items() if not e.is_set())
        finally:
            self._waiters.subtract(run_ids)
            for r in run_ids:
                if self._waiters[r] <= 0:
                    del self._waiters[r]
                    self._finished.pop(r, None)

    async def _check_finished(self, run_ids: list[str], events: dict[str, trio.Event]) -> None:
        local = [self.owner.local_run(r) for r in run_ids]
        remote = [r for r, run in zip(run_ids, local, strict=True) if run is None]
        for run in local:
            if run is not None and run.done.is_set():
                events[run.id].set()
        if not remote:
            return
        try:
            for run_id in remote:
                status = await self._call(self.client.hget(self._r(run_id), "status"))
                if status != "running":
                    events[run_id].set()
        except SharedUnavailable:
            pass  # keep waiting: the deadline still bounds it


class RedisState(_RedisSessions):
    """The shared state in Redis (or Valkey), through coredis (AnyIO: native
    under trio).  ``lease`` is ``--node-lease``; ``ttl`` is ``--run-ttl``.

    Its parts: the connection, scripts and keys (:class:`_RedisBase`), the
    detached logs (:class:`_RedisLogs`, G7), sessions, cancel and completion
    (:class:`_RedisSessions`, G1-G5), and here the lease and background
    tasks, the registry (G6) and node loss.
    """

    ships_logs = True

    # -- background -------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the client, the lease, the listeners and the pollers.

        Cancellation: a ``Cancelled`` stops the heartbeat, listeners and pollers and closes the
        client; the lease then expires by itself unless :meth:`leave` ran.

        Started once the node's first heartbeat is done (:meth:`_heartbeat`)
        and its listener subscribed (:meth:`_listen`): a node registers runs
        only after it is in ``ts:nodes`` with a lease, so a survivor can
        always find the runs of a node that dies, and it hears cancel
        requests from the start.  Each first step is bounded (the heartbeat
        by :data:`CALL_TIMEOUT`, the subscription by the connect timeout and
        :data:`CALL_TIMEOUT`); if the heartbeat fails the node starts
        unhealthy (new streams get 503) and joins when Redis answers.  Runs
        until cancelled.
        """
        async with self.client, trio.open_nursery() as nursery:
            await nursery.start(self._heartbeat)
            await nursery.start(self._listen)
            nursery.start_soon(self._poll_cancels)
            nursery.start_soon(self._reap)
            task_status.started()

    async def leave(self) -> None:
        """Leave the cluster cleanly (shutdown, after every run ended).

        Cancellation: a ``Cancelled`` between its two steps leaves the rest to the lease's
        expiry.
        """
        n = self.prefix
        with contextlib.suppress(SharedUnavailable):
            await self._call(self.client.srem(f"{n}nodes", [self.node]))
            await self._call(self.client.delete([f"{n}n:{self.node}", f"{n}nr:{self.node}"]))

    async def _heartbeat(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Renew the lease (and membership of ``ts:nodes``) until cancelled.

        Reports started after the first renewal landed or failed: before it,
        the node is not in ``ts:nodes``, and a run it registered then would
        be nobody's to take over if the node died.
        """
        n = self.prefix
        first = True
        while True:
            was = self._healthy
            try:
                await self._call(self._beat(n))
                if not was:  # healthy again only once caught up, or tried again
                    await self._resync()
                elif self._missed:  # steps a call's deadline cut while Redis was up
                    await self._redo_missed()
                self._healthy = True
            except SharedUnavailable:
                self._healthy = False
            if first:
                first = False
                task_status.started()
            await trio.sleep(min(self.lease / 3, HEARTBEAT) if self._healthy else 0.2)

    # -- upstream members' cooldowns ------------------------------------------
    shares_cooldowns = True

    async def share_cooldowns(self, cooldowns: Mapping[str, float]) -> None:
        """``ts:cool:{member}`` for each, expiring with the cooldown (``_COOL``:
        never shortened).  Cancellation: atomic per member."""
        for member, seconds in cooldowns.items():
            ms = max(1, math.ceil(seconds * 1000))
            await self._call(self._cool(keys=[f"{self.prefix}cool:{member}"], args=[ms]))

    async def cooldowns(self, members: Sequence[str]) -> dict[str, float]:
        """The members whose ``ts:cool:{member}`` lives, with its time to live.
        Cancellation: reads only."""
        out: dict[str, float] = {}
        for member in members:
            left = await self._call(self.client.pttl(f"{self.prefix}cool:{member}"))
            if left > 0:
                out[member] = left / 1000
        return out

    async def _beat(self, n: str) -> None:
        keys = [f"{n}n:{self.node}", f"{n}nodes"]
        await self._beat_script(keys=keys, args=[self.node, int(self.lease * 1000)])

    async def _resync(self) -> None:
        """After an outage: put this node's live runs back (a restarted Redis
        may have lost them): their records, their sessions (``_RESTORE``), and
        their detached logs (each shipper checks its log); then do the cleanup
        steps of ended runs that Redis missed (:meth:`_cleanup_step`).  Raises
        :class:`SharedUnavailable` if Redis goes away again meanwhile."""
        for run in list(self.owner_runs()):
            await self.register(run)
            if run.session_key is not None:
                running = "1" if run.log.outcome is None else "0"
                args = [run.id, running, str(run.epoch)]
                await self._call(self._restore(keys=[self._s(run.session_key)], args=args))
        await self._redo_missed()
        self._resyncs += 1
        self._reship.set()
        self._reship = trio.Event()
        for run in self.owner_runs():
            run.poke()  # an idle shipper checks its log now

    async def _redo_missed(self) -> None:
        for name, step in list(self._missed.items()):
            await self._call(step())
            if self._missed.get(name) is step:
                del self._missed[name]

    def owner_runs(self) -> list[RunView]:
        runs: dict[str, RunView] = getattr(self.owner, "runs", {})
        return [r for r in runs.values() if not r.done.is_set()]

    async def _listen(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver cancel requests and "finished" notices as they come, on a
        connection of the listener's own (:func:`.redis_conn.listen`: not the
        pool's, never closed for idleness).  Each time it has subscribed
        (again), it catches up (:meth:`_catch_up`) on what was published while
        it was not.  Reports started once subscribed, or once the first attempt
        failed (the pollers find what pub/sub misses meanwhile).
        """
        n = self.prefix
        channels = [f"{n}cancel:{self.node}", f"{n}finished"]
        await listen(self.client, channels, self._deliver, self._catch_up, task_status=task_status)

    async def _catch_up(self) -> None:
        """Re-read what the notices lost while the listener was not subscribed
        announce: cancel requests for this node's runs, and whether the runs
        that requests here wait for have finished.  Cancellation: reads, and
        local cancels."""
        self.caught_up += 1
        await self._find_cancels()
        await self._check_finished(list(self._finished), self._finished)

    def _deliver(self, channel: str, data: str) -> None:
        if channel.endswith("finished"):
            event = self._finished.get(data)
            if event is not None:
                event.set()
            return
        run_id, _, reason = data.partition("\t")
        self.owner.cancel_local(run_id, reason)

    async def _poll_cancels(self) -> None:
        """G4's safety net: find cancel requests whose message was lost."""
        while True:
            await trio.sleep(CANCEL_POLL)
            await self._find_cancels()

    async def _find_cancels(self) -> None:
        runs = [r.id for r in self.owner_runs()]
        if not runs:
            return
        try:
            reasons = await self._call(self.client.mget([self._c(r) for r in runs]))
        except SharedUnavailable:
            return
        for run_id, reason in zip(runs, reasons, strict=True):
            if reason is not None:
                self.owner.cancel_local(run_id, reason)

    # -- registry ---------------------------------------------------------
    async def register(self, run: RunView) -> None:
        """Cancellation: a checkpoint; one script, written or not."""
        fields = {
            "tenant": run.tenant, "session": run.session_id or "", "node": self.node,
            "detached": "1" if run.detached else "0", "status": "running", "reason": "",
            "model": run.request.model, "created": repr(run.created),
            "usage": "1" if run.request.client_wants_usage else "0",
        }  # fmt: skip
        keys = [self._r(run.id), f"{self.prefix}nr:{self.node}"]
        args = [run.id, *(x for pair in fields.items() for x in pair)]
        await self._call(self._register(keys=keys, args=args))

    async def finished(self, run: RunView) -> None:
        """Cancellation: a checkpoint; a notice that a ``Cancelled`` cut is redone once Redis
        answers (as :meth:`release`).
        """
        outcome = run.log.outcome
        assert outcome is not None
        await self._cleanup_step(
            f"finished:{run.id}", partial(self._end_record, self.node, run.id, outcome)
        )

    async def _end_record(self, node: str, run_id: str, outcome: Outcome) -> None:
        n = self.prefix
        keys = [self._r(run_id), f"{n}nr:{node}"]
        args = [outcome.status.value, outcome.reason, self.ttl, run_id, f"{n}finished"]
        await self._call(self._end(keys=keys, args=args))

    async def lookup(self, run_id: str) -> RunRecord | None:
        """Cancellation: a checkpoint; a read."""
        fields = await self._call(self.client.hgetall(self._r(run_id)))
        if not fields or "tenant" not in fields:
            return None
        return RunRecord(
            id=run_id, tenant=fields["tenant"], session_id=fields.get("session") or None,
            node=fields.get("node", ""), detached=fields.get("detached") == "1",
            status=fields.get("status", "running"), reason=fields.get("reason") or None,
            model=fields.get("model", ""), created=float(fields.get("created", "0")),
            include_usage=fields.get("usage") == "1",
        )  # fmt: skip

    # -- node loss --------------------------------------------------------
    async def _reap(self) -> None:
        """Notice dead nodes (their lease expired) and end their runs."""
        n = self.prefix
        while True:
            await trio.sleep(self.lease / 2)
            try:
                nodes = await self._call(self.client.smembers(f"{n}nodes"))
                for node in nodes - {self.node}:
                    alive = await self._call(self.client.exists([f"{n}n:{node}"]))
                    if not alive:
                        await self._take_over(node)
            except SharedUnavailable:
                continue

    async def _take_over(self, node: str) -> None:
        """End a dead node's runs, once, even if this survivor fails midway.

        The survivor that sets the node's takeover lock (``SET NX`` with an
        expiry) does the work, and removes the node from ``ts:nodes`` only
        when it is done.  If Redis or this process fails meanwhile, the lock
        expires and another survivor (or this one) takes over again; every
        step of it is idempotent (the save's primary key, the log's end, hash
        sets, compare-and-delete)."""
        n = self.prefix
        hold = int(max(self.lease, TAKEOVER_HOLD) * 1000)
        lock = self.client.set(f"{n}takeover:{node}", self.node, condition=PureToken.NX, px=hold)
        if not await self._call(lock):
            return  # another survivor is at it
        run_ids = await self._call(self.client.smembers(f"{n}nr:{node}"))
        records = [r for r in [await self.lookup(x) for x in run_ids] if r is not None]
        lost = [r for r in records if r.status == "running"]
        await self.owner.adopt_lost(node, lost)
        await self._call(self.client.delete([f"{n}nr:{node}"]))
        await self._call(self.client.srem(f"{n}nodes", [node]))

    async def end_lost(self, record: RunRecord, last_seq: int) -> None:
        """End a dead node's run: its log's end, its record, its session.

        Cancellation: a checkpoint at each step; every step is idempotent, so a ``Cancelled``
        between them is finished by the next takeover.
        """
        outcome = Outcome(RunStatus.FAILED, "node_lost", "The node running this run was lost.")
        if record.detached:
            await self.write_end(record.id, last_seq, outcome)
        await self._end_record(record.node, record.id, outcome)
        if record.session_id is not None:
            await self.release((record.tenant, record.session_id), record.id)
