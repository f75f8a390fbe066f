"""What this node asks of, and does for, the runs other nodes own -- trio layer.

The run manager drives the runs of this process; :class:`Cluster` is its
voice towards the rest of the cluster, through the shared state
(:class:`~trio_stream.shared.SharedState`): looking a run up (G6), copying a
remote detached run's log into a local read-only *mirror* (G7), and ending
the runs of a node that was lost.  In-process (no ``--redis``) every lookup
finds nothing and nothing here touches the network.

Errors: a shared state that cannot be reached raises
:class:`~trio_stream.shared.SharedUnavailable`; the HTTP layer answers it
(503), this layer never speaks HTTP.
"""

from __future__ import annotations

from typing import Any

import trio

from ..core.log import Outcome, RunStatus
from ..logs import EventLogger
from ..metrics import Metrics
from ..shared import RunRecord, SharedState, SharedUnavailable
from ..store import Store
from ..tracing import NO_TRACING, Tracing
from ..wire.chunks import ChunkEncoder
from ..wire.request import ChatRequest
from .run import Run, follow_page
from .saving import save_run


class Cluster:
    """Looks up, mirrors and adopts runs owned by other nodes."""

    def __init__(
        self,
        shared: SharedState,
        store: Store,
        metrics: Metrics,
        logger: EventLogger,
        coalesce: bool,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.shared = shared
        self.tracing = tracing
        self.store = store
        self.metrics = metrics
        self.logger = logger
        self.coalesce = coalesce

    async def remote(self, tenant: str, run_id: str) -> RunRecord | None:
        """A run another process owns, if it belongs to ``tenant`` (G6).

        Cancellation: cancellable wherever the shared state waits (in-process
        it never does); a ``Cancelled`` leaves nothing behind.
        """
        record = await self.shared.lookup(run_id)
        return record if record is not None and record.tenant == tenant else None

    async def cancel_remote(self, run_id: str, reason: str) -> bool:
        """Ask the owner of a run this node does not hold to cancel it (G4).
        True if it was running.

        Cancellation: a checkpoint on each shared-state step; a ``Cancelled``
        leaves the cancel request sent or not (it is one atomic write).
        """
        record = await self.shared.lookup(run_id)
        if record is None or record.status != "running":
            return False
        await self.shared.cancel(run_id, reason)
        return True

    async def remote_public(self, record: RunRecord) -> dict[str, Any]:
        """The ``GET /v1/runs/{id}`` object of a run another process owns.

        Cancellation: cancellable while it reads the shared log; a
        ``Cancelled`` leaves nothing behind (the mirror is local and dropped).
        """
        page = await self.shared.read_log(record.id, 0, wait=False)
        mirror = self.mirror(record)
        follow_page(mirror, page)
        public = mirror.public()
        if page.outcome is None:  # attached elsewhere: only its record is shared
            public["status"], public["reason"] = record.status, record.reason
        return public

    def mirror(self, record: RunRecord) -> Run:
        """A local, read-only copy of a remote detached run, fed by :meth:`feed`."""
        body: dict[str, Any] = {"model": record.model, "messages": [], "stream": True}
        if record.include_usage:
            body["stream_options"] = {"include_usage": True}
        request = ChatRequest(body, record.model, [], True, None, record.detached)
        run = Run(
            record.id, record.tenant, record.session_id, request,
            detached=record.detached, coalesce=self.coalesce,
        )  # fmt: skip
        run.created = record.created
        run.span = self.tracing.remote(record.traceparent)  # subscribers link to it
        # The chunks' ``created`` is the run's start on the node that runs it.
        run.encoder = ChunkEncoder(
            run.encoder.completion_id, record.model, int(record.created), coalesce=self.coalesce
        )
        return run

    async def feed(self, mirror: Run, cursor: int) -> None:
        """Follow a remote run's shared log into ``mirror`` until its end (G7).

        Runs beside the mirror's subscriber and dies with it.  If Redis goes
        away mid-follow the mirror ends ``failed`` (reason
        ``shared_state_unavailable``), so the follower is told, never hung.

        Cancellation: a checkpoint on every read of the shared log.  A
        ``Cancelled`` (the subscriber left) propagates and leaves the mirror
        where it was, unfinished; nothing of the remote run is touched.
        """
        try:
            while mirror.log.outcome is None:
                follow_page(mirror, await self.shared.read_log(mirror.id, cursor, wait=True))
                cursor = mirror.log.last_seq
        except SharedUnavailable as exc:
            mirror.end(Outcome(RunStatus.FAILED, "shared_state_unavailable", str(exc)))
        mirror.finished()

    async def adopt_lost(self, node: str, records: list[RunRecord], save_timeout: float) -> None:
        """End the runs of a node whose lease expired: save each detached
        run's partial once from its shared log (shielded, within
        ``save_timeout``), end its log and record, and free its session (the
        backend's ``end_lost``).

        Cancellation: a checkpoint while it reads each log and ends each
        record; the saves are shielded.  A ``Cancelled`` stops it between
        two steps: the runs not yet reached keep their records as they were.
        """
        self.logger.event("node_lost", node=node, runs=len(records))
        for record in records:
            page = await self.shared.read_log(record.id, 0, wait=False)
            mirror = self.mirror(record)
            follow_page(mirror, page)
            outcome = Outcome(RunStatus.FAILED, "node_lost", "The node running this run was lost.")
            mirror.end(outcome)
            saved = "timeout"
            with trio.CancelScope(shield=True) as cs:
                cs.deadline = trio.current_time() + save_timeout
                saved = await save_run(mirror, self.store, self.metrics, self.logger)
            self.tracing.takeover(record.traceparent, {
                "trio_stream.run.id": record.id, "trio_stream.node.lost": node,
                "trio_stream.node.survivor": self.shared.node, "reason": "node_lost",
                "trio_stream.save": saved,
            })  # fmt: skip
            await self.shared.end_lost(record, mirror.log.last_seq)
            self.metrics.runs.labels("failed").inc()
            self.logger.event("stream_cancelled", trace=record.id, reason="node_lost")

    async def current(self, tenant: str, session_id: str) -> str | None:
        """The id of the session's current run, wherever it runs.

        Cancellation: cancellable wherever the shared state waits (in-process
        it never does); a ``Cancelled`` leaves nothing behind.
        """
        return await self.shared.current((tenant, session_id))

    async def session_known(self, tenant: str, session_id: str) -> bool:
        """Has the session a live run anywhere?

        Cancellation: as :meth:`current`.
        """
        return bool(await self.shared.live((tenant, session_id)))
