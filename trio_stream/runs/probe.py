"""The probe: ``GET {url}/models`` brings a cooling member back (the trio half
of :mod:`trio_stream.core.router`'s rules P1-P3, which decide everything here).

:func:`probe_members` runs in the service's nursery when some member has
``probe = true`` (docs/api.md section 1.3).  Each round it asks the router
which members are due (P1), probes them all at once -- each in a task of the
round's nursery, bounded by its member's ``probe_interval_ms`` -- tells the
router each result (P2/P3), then sleeps until the next probe is due or a
cooldown starts::

    service nursery
    └── probe_members                 waits between rounds
        └── round nursery             one round; closed before the next wait
            └── probe(member)         client.models() under its interval's deadline

A probe is the member's own client's :meth:`~trio_stream.upstream.Upstream.models`
call: the same connection pool and key as its streams.
"""

from __future__ import annotations

import trio

from ..errors import UpstreamError
from .routes import Routes


async def probe_members(
    routes: Routes, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Probe cooling members until cancelled (module docstring).

    Cancellation: runs until cancelled; a ``Cancelled`` ends the probes under
    way (each client call is cancellable) and leaves the router as it was.
    """
    router = routes.router
    task_status.started()
    while True:
        due = router.probes_due(trio.current_time())
        if due:
            async with trio.open_nursery() as round_:
                for name in due:
                    round_.start_soon(_probe, routes, name)
        await routes.wait_for_cooldown(router.next_probe_at(trio.current_time()))


async def _probe(routes: Routes, name: str) -> None:
    """One probe of ``name``: P2 if it answers within its interval, else P3."""
    interval = routes.router.members[name].spec.probe_interval_ms / 1000
    error = "no answer within probe_interval_ms"
    answered = False
    with trio.move_on_after(interval):
        try:
            await routes.clients[name].models()
            answered = True
        except UpstreamError as exc:
            error = exc.message
    back = routes.router.probed(name, answered, trio.current_time())
    routes.metrics.upstream_probes.labels(name, "answered" if answered else "failed").inc()
    routes.logger.event(
        "upstream_probe", member=name, answered=answered, back=back,
        error=None if answered else error,
    )  # fmt: skip
