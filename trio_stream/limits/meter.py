"""Charging a stream's tokens to its key while it streams.

The reader of a run does nothing for it, per token or otherwise.  Every
:data:`FLUSH` seconds the :class:`Charger` asks each running run's
:class:`Meter` how many deltas its run has received (``count``: the run
log's length), adds what is new to its pending sums (no checkpoint), and
sends the sums to the limiter, one charge per key and model.  When the
run ends, its cleanup :meth:`Meter.settle` s it: the difference between the
run's final usage (the upstream's when it reported one, the counted fallback
otherwise: docs/api.md section 2.10) and what was already charged is added,
and the key's sums are sent before the run is FINISHED -- so once a client
has the stream's end, the next request of its key sees every token.  The
run's stream slot (a key with ``max_streams``) is freed by that same call:
a run's end costs one call to the limiter, not two.

A stream in progress is never cut by its own tokens: a charge is never
refused (L2 of :mod:`.base`).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..wire.usage import Usage
from .base import Limiter, LimitsUnavailable

#: Seconds between two sends of the pending sums.
FLUSH = 0.25

_Pending = dict[tuple[str, str], list[int]]  # (key, model) -> [requests, prompt, completion]


class Charger:
    """The pending charges of every metered run, sent in the background."""

    def __init__(
        self,
        limiter: Limiter,
        on_error: Callable[[str], None] | None = None,
        on_charged: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.limiter = limiter
        self.pending: _Pending = {}
        #: Stream slots to free with their key's next charge (runs that ended).
        self.releases: dict[str, list[str]] = {}
        self.meters: set[Meter] = set()  # of the runs not settled yet
        self._on_error = on_error  # (message): a send that did not land
        self._on_charged = on_charged  # (key, prompt, completion): a send that did

    def add(self, name: str, model: str, requests: int, prompt: int, completion: int) -> None:
        """Add to a key's pending sums.  Not a checkpoint."""
        if not (requests or prompt or completion):
            return
        sums = self.pending.setdefault((name, model), [0, 0, 0])
        sums[0] += requests
        sums[1] += prompt
        sums[2] += completion

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send the pending sums every :data:`FLUSH` seconds until cancelled.

        Cancellation: a ``Cancelled`` stops the sends; what is pending then
        is left for a last :meth:`flush`, which the service does after its
        last run and before the limiter's client closes
        (:func:`trio_stream.http.service.open_service`).
        """
        task_status.started()
        while True:
            await trio.sleep(FLUSH)
            for meter in self.meters:
                meter.poll()
            await self.flush()

    async def flush(self, name: str | None = None) -> None:
        """Send the pending sums (of key ``name``, or all), each with the
        stream slots its key has to free (:attr:`releases`); slots of a key
        with no sum pending are released on their own.  A sum that did not
        land (the limiter is unreachable) stays pending for the next round;
        its slots do not (their requests release them as they end, and a
        slot's lease expires).

        Cancellation: a checkpoint per call; a ``Cancelled`` puts the sum in
        flight back (it is sent again later, so if its charge had landed it
        counts twice: an over-charge, never an under-charge).
        """
        for key in [k for k in self.pending if name is None or k[0] == name]:
            sums = self.pending.pop(key, None)
            if sums is None:
                continue
            slots = tuple(self.releases.pop(key[0], ()))
            try:
                await self.limiter.charge(
                    key[0], key[1], sums[1], sums[2], requests=sums[0], release=slots
                )
            except LimitsUnavailable as exc:
                self.add(key[0], key[1], *sums)
                if self._on_error is not None:
                    self._on_error(str(exc))
                return  # the store is down: the other sums wait for the next round
            except BaseException:
                self.add(key[0], key[1], *sums)
                raise
            if self._on_charged is not None:
                self._on_charged(key[0], sums[1], sums[2])
        for key_name in [n for n in self.releases if name is None or n == name]:
            for slot in self.releases.pop(key_name, ()):
                try:
                    await self.limiter.release(key_name, slot)
                except LimitsUnavailable:
                    return


class Meter:
    """One run's charges (its key ``name``, its ``model``).  :data:`NO_METER`
    is the meter of a run with nothing to charge."""

    __slots__ = (
        "_charger", "_completion", "_count", "_model", "_name", "_prompt", "_release",
        "_started", "_urgent",
    )  # fmt: skip

    def __init__(
        self, charger: Charger | None, name: str, model: str, prompt: int, *,
        count: Callable[[], int] = lambda: 0, urgent: bool = True, release: str | None = None,
    ) -> None:  # fmt: skip
        """``count``: the deltas the run has received so far.  ``urgent``:
        send the key's sums as the run ends (its key has a token limit or
        budget, which the next request must see); otherwise the charger's
        next round sends them.  ``release``: the run's stream slot, freed
        with its last charge as it ends (then the sums are sent at once, in
        the same call).  Charged from now on until :meth:`settle`."""
        self._charger = charger
        self._release = release
        self._count = count
        self._urgent = urgent
        self._name = name
        self._model = model
        self._prompt = prompt  # the counted estimate, charged with the first delta
        self._started = False
        self._completion = 0  # deltas charged so far
        if charger is not None:
            charger.meters.add(self)

    def poll(self) -> None:
        """Charge what the run received since the last poll.  Not a checkpoint."""
        self.stream(self._count())

    def stream(self, deltas: int) -> None:
        """The run has received ``deltas`` deltas in all.  Not a checkpoint."""
        if self._charger is None:
            return
        if not self._started:
            self._started = True
            self._charger.add(self._name, self._model, 1, self._prompt, 0)
        self._charger.add(self._name, self._model, 0, 0, deltas - self._completion)
        self._completion = deltas

    async def settle(self, usage: Usage) -> None:
        """Charge the rest of the run's final ``usage`` and (``urgent``) send
        the key's sums.

        Cancellation: as :meth:`Charger.flush`; what is not sent stays
        pending for the charger's next round.
        """
        if self._charger is None:
            return
        self._charger.meters.discard(self)
        prompt = self._prompt if self._started else 0
        self._charger.add(
            self._name, self._model, 0 if self._started else 1,
            usage.prompt_tokens - prompt, usage.completion_tokens - self._completion,
        )  # fmt: skip
        self._started = True
        self._prompt, self._completion = usage.prompt_tokens, usage.completion_tokens
        slot, self._release = self._release, None
        if slot is not None:
            self._charger.releases.setdefault(self._name, []).append(slot)
        if self._urgent or slot is not None:
            await self._charger.flush(self._name)


#: The meter of every run that charges nothing.
NO_METER = Meter(None, "", "", 0)
