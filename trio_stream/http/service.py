"""The service: everything one server instance owns, and its lifetime.

:func:`open_service` builds the store, the upstream, the metrics and the run
manager, starts the manager's long-lived nursery, and tears it all down in
reverse order.  The HTTP layer (:mod:`trio_stream.http.app`) and the server
(:mod:`trio_stream.server.serve`) only borrow it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from prometheus_client import Gauge

from ..config import Settings, is_loopback
from ..core.router import Router, UnknownModel
from ..errors import (
    ConfigError,
    UpstreamError,
    model_not_found,
    shutting_down,
    too_many_streams,
    unauthorized,
)
from ..limits import create_limiter
from ..limits.base import CALL_TIMEOUT as LIMITS_TIMEOUT
from ..limits.file import load_keys
from ..limits.keys import KeyDef, digest_of
from ..logs import EventLogger
from ..metrics import Metrics
from ..runs import SHARED_TIMEOUT, RunManager
from ..runs.probe import probe_members
from ..runs.routes import Routes
from ..shared import SharedState, create_shared
from ..store import Store, open_store
from ..tracing import NO_TRACING, Tracing, create_tracing
from ..upstream import Upstream, create_member
from .asgi import Scope, Send, header
from .limits import KeyLimits, RatedSend
from .stream import BurstWatch, Pinger

PUBLIC_TENANT = "public"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: its tenant, and its ``[[key]]`` (``None`` for an
    ``--api-key`` key, unlimited, and for open access)."""

    tenant: str
    key: KeyDef | None = None


class Auth:
    """Bearer keys: the ``--api-key`` keys (each its own tenant, a hash of
    the key) and the ``[[key]]`` tables of the configuration file (their
    tenant, name and limits).  Only SHA-256 digests are kept; a presented
    key is hashed and compared with every digest, in constant time in the
    keys, so a key is never stored, logged or compared in variable time."""

    def __init__(self, keys: tuple[str, ...], defs: Sequence[KeyDef] = ()) -> None:
        self._api = [(digest_of(k), Caller(_tenant_of(k))) for k in keys]
        self._all: list[tuple[bytes, Caller]] = []
        self.reload(defs)

    def reload(self, defs: Sequence[KeyDef]) -> None:
        """Replace the ``[[key]]`` keys at once (``SIGHUP``); the ``--api-key``
        keys stay.  A request already admitted keeps the key it was admitted
        with.  Raises :class:`ConfigError` (nothing replaced) for a secret that
        is also an ``--api-key`` key."""
        api = {digest for digest, _ in self._api}
        if any(d.digest in api for d in defs):
            raise ConfigError("a [[key]] secret is also given with --api-key")
        if not defs and not self._api and self._all:
            raise ConfigError("no [[key]] left and no --api-key: refusing to open access")
        self._all = [*self._api, *((d.digest, Caller(d.tenant, d)) for d in defs)]

    @property
    def open(self) -> bool:
        return not self._all

    @property
    def names(self) -> list[str]:
        """The names of the ``[[key]]`` keys now."""
        return [c.key.name for _, c in self._all if c.key is not None]

    def find(self, authorization: str | None) -> Caller | None:
        """The caller, or ``None`` for a missing or unknown key."""
        if self.open:
            return _PUBLIC
        scheme, _, token = (authorization or "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).digest()
        found: Caller | None = None
        for digest, caller in self._all:  # no early exit: constant time in the keys
            if hmac.compare_digest(digest, given) and scheme.lower() == "bearer":
                found = caller
        return found

    def caller(self, authorization: str | None) -> Caller:
        """The caller, or :func:`~trio_stream.errors.unauthorized`."""
        found = self.find(authorization)
        if found is None:
            raise unauthorized()
        return found

    def tenant(self, authorization: str | None) -> str:
        """The caller's tenant, or :func:`~trio_stream.errors.unauthorized`."""
        return self.caller(authorization).tenant


_PUBLIC = Caller(PUBLIC_TENANT)


def check_keys(settings: Settings) -> tuple[KeyDef, ...]:
    """The ``--config`` file's keys, checked as the server starts with them
    (a bad file, a secret also given with ``--api-key``, no key at all on a
    non-loopback address): :class:`ConfigError` naming each problem."""
    keys = load_keys(settings.config) if settings.config else ()
    Auth(settings.api_keys, keys)
    if not keys and not settings.api_keys and not is_loopback(settings.host):
        raise ConfigError(
            f"refusing to serve {settings.host} without an API key: "
            "give --api-key or [[key]] tables, or bind a loopback address"
        )
    return keys


def _tenant_of(key: str) -> str:
    return "k_" + hashlib.sha256(key.encode()).hexdigest()[:16]


class Service:
    def __init__(
        self,
        settings: Settings,
        *,
        logger: EventLogger,
        metrics: Metrics,
        store: Store,
        clients: Mapping[str, Upstream],
        shared: SharedState | None = None,
        keys: Sequence[KeyDef] = (),
        limits: KeyLimits | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.settings = settings
        self.tracing = tracing
        self.logger = logger
        self.metrics = metrics
        self.store = store
        #: One client per upstream member, by member name.
        self.clients = dict(clients)
        self.router = Router(settings.members())
        self.routes = Routes(settings, self.router, self.clients, metrics, logger, tracing)
        self.auth = Auth(settings.api_keys, keys)
        self.limits = limits or KeyLimits(
            create_limiter(None), closed=True, metrics=metrics, logger=logger
        )
        self.runs = RunManager(settings, self.routes, store, metrics, logger, shared, tracing)
        # Which process answered a scrape: with --workers, one port, N nodes.
        Gauge(
            "trio_stream_node_info", "This process's node id (cluster mode; 'local' embedded).",
            ["node"], registry=metrics.registry,
        ).labels(self.runs.shared.node).set(1)  # fmt: skip
        self.pinger = Pinger(settings.ping_interval)
        self.bursts = BurstWatch()
        self.shutting_down = False
        self.streams = 0
        self._streams_changed = trio.lowlevel.ParkingLot()
        self._slot = _StreamSlot(self)

    def rated(self, scope: Scope, send: Send) -> Send:
        """``send`` for a request of a key with a rate (``rpm`` or ``tpm``):
        every answer's head gets the key's ``x-ratelimit-*`` headers -- on
        every route and every status, from the one place requests pass
        through (:meth:`TrioStreamApp.__call__
        <trio_stream.http.app.TrioStreamApp.__call__>`).  Any other request's
        ``send`` is returned as it is."""
        caller = self.auth.find(header(scope, b"authorization"))
        key = caller.key if caller is not None else None
        if key is None or (key.limits.rpm is None and key.limits.tpm is None):
            return send
        return RatedSend(send, self.limits, key)

    def check_model(self, model: str) -> None:
        """404 ``model_not_found`` unless some upstream member serves ``model``."""
        try:
            self.router.group(model)
        except UnknownModel:
            raise model_not_found(model) from None

    async def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: the union of the models the members list by
        name and of those the ``"*"`` members' upstreams report, each once.
        A ``"*"`` member whose list fails is left out (logged), unless all do.

        Cancellation: a checkpoint per ``"*"`` member; a ``Cancelled`` leaves nothing behind.
        """
        out: dict[str, dict[str, Any]] = {}
        for name in self.router.named_models():
            owner = self.router.group(name)[0].name
            out[name] = {"id": name, "object": "model", "created": 0, "owned_by": owner}
        errors: list[UpstreamError] = []
        members = self.router.any_members()
        for member in members:
            try:
                listed = await self.clients[member.name].models()
            except UpstreamError as exc:
                self.logger.event("models_failed", member=member.name, error=exc.message)
                errors.append(exc)
                continue
            for model in listed:
                if isinstance(model.get("id"), str):
                    out.setdefault(model["id"], model)
        if members and len(errors) == len(members) and not out:
            raise errors[0]
        return list(out.values())

    def stream_slot(self) -> _StreamSlot:
        """Admit one client stream (503 while shutting down, 429 when full):
        ``with service.stream_slot(): ...``.

        The context manager holds no state of its own, so every stream shares
        one: an open stream holds no generator frame for its slot.
        """
        return self._slot

    def _admit(self) -> None:
        if self.shutting_down:
            raise shutting_down()
        if self.streams >= self.settings.max_streams:
            raise too_many_streams(self.settings.max_streams)
        self.streams += 1
        self.metrics.active_streams.inc()

    def _release(self) -> None:
        self.streams -= 1
        self.metrics.active_streams.dec()
        self._streams_changed.unpark_all()

    async def reload_keys(self) -> bool:
        """Read the configuration file's ``[[key]]`` tables again (``SIGHUP``)
        and put them in force at once.  A file that cannot be read or has a
        bad key is refused whole, logged ``keys_reload_refused``, and the keys
        in force stay; returns whether the new keys are in force.  Streams in
        flight keep the key they were admitted with: none is dropped.

        Cancellation: a checkpoint (the file is read in a worker thread); a
        ``Cancelled`` leaves the keys as they were.
        """
        path = self.settings.config
        if path is None:
            self.logger.event("keys_reload_refused", error="no --config file")
            return False
        try:
            keys = await trio.to_thread.run_sync(load_keys, path)
            self.auth.reload(keys)
        except ConfigError as exc:
            self.logger.event("keys_reload_refused", error=str(exc))
            return False
        self.logger.event("keys_reloaded", keys=len(keys))
        return True

    async def wait_streams_closed(self) -> None:
        """Block until no client stream is open.  Cancellation: a checkpoint only when it has to
        wait; a ``Cancelled`` leaves nothing behind.
        """
        while self.streams:
            await self._streams_changed.park()


class _StreamSlot:
    """:meth:`Service.stream_slot`: admit on entry, release on exit."""

    __slots__ = ("_service",)

    def __init__(self, service: Service) -> None:
        self._service = service

    def __enter__(self) -> None:
        self._service._admit()

    def __exit__(self, *exc: object) -> None:
        self._service._release()


def _open_store(settings: Settings) -> Store:
    return open_store(settings.db, timeout=settings.save_timeout)


@asynccontextmanager
async def open_service(
    settings: Settings,
    *,
    logger: EventLogger | None = None,
    store: Store | None = None,
    upstream: Upstream | None = None,
    clients: Mapping[str, Upstream] | None = None,
    keys: Sequence[KeyDef] | None = None,
    trace_exporter: object = None,
) -> AsyncIterator[Service]:
    """Build a :class:`Service` and run its manager until the block exits.

    ``clients``: the upstream members' clients by name (tests, embedders);
    each member without one gets :func:`~trio_stream.upstream.create_member`'s.
    ``upstream``: the client of the only member (the shorthand's).
    ``trace_exporter``: an OpenTelemetry span exporter (tests); it turns
    tracing on as ``--otel`` does, exporting there instead of OTLP/HTTP.

    On exit (normal or ``Cancelled``) every live run is cancelled and saved
    (each save shielded with ``--save-timeout``) before the upstream clients and
    the database close.
    """
    settings.validate()
    if keys is None:  # the configuration file's [[key]] tables
        keys = check_keys(settings)
    logger = logger or EventLogger(settings.log_format)
    db = store if store is not None else await trio.to_thread.run_sync(_open_store, settings)
    specs = settings.members().members
    given = dict(clients or {})
    if upstream is not None:
        (only,) = specs
        given[only.name] = upstream
    members = {m.name: given.get(m.name) or create_member(settings, m) for m in specs}
    shared = create_shared(settings)
    metrics = Metrics()
    limiter = create_limiter(settings.limits_redis or settings.redis)
    limits = KeyLimits(
        limiter, closed=settings.limits_on_outage == "closed", metrics=metrics, logger=logger
    )
    tracing = create_tracing(settings, metrics, trace_exporter)
    if tracing.enabled:
        logger.ids = tracing.log_ids
    service = Service(
        settings, logger=logger, metrics=metrics, store=db, clients=members, shared=shared,
        keys=keys, limits=limits, tracing=tracing,
    )  # fmt: skip
    try:
        # The shared state and the store's committer outlive the runs: their
        # cleanups save, release sessions and publish their ends through them.
        async with trio.open_nursery() as outer:
            await outer.start(shared.run)
            await outer.start(db.run)
            # The limiter outlives the runs too: each run's cleanup charges
            # its last tokens; the charger's last flush follows the last run.
            await outer.start(limiter.run)
            await outer.start(limits.charger.run)
            async with trio.open_nursery() as nursery:
                await nursery.start(service.runs.run)
                await nursery.start(service.pinger.run)
                await nursery.start(service.bursts.run)
                for client in members.values():
                    await nursery.start(client.run)
                if any(m.probe for m in specs):  # P1-P3: bring cooling members back
                    await nursery.start(probe_members, service.routes)
                if shared.shares_cooldowns:  # cluster mode: cooldowns are every node's
                    interval = min(settings.node_lease / 3, 1.0)  # the shared state's heartbeat
                    await nursery.start(service.routes.share_cooldowns, shared, interval)
                try:
                    yield service
                finally:
                    nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True) as cs:
                cs.deadline = trio.current_time() + SHARED_TIMEOUT
                await shared.leave()
            with trio.CancelScope(shield=True) as cs:  # the charges of the last runs
                cs.deadline = trio.current_time() + LIMITS_TIMEOUT + 0.5
                await limits.charger.flush()
            outer.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True) as cs:
            cs.deadline = trio.current_time() + settings.save_timeout
            for client in members.values():
                await client.aclose()
        db.close()
        await tracing.aclose()  # after the last run's span ended; shielded, bounded
