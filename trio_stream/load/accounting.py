"""The load generator's bookkeeping, sans-IO: replies, outcomes, integrity, the report.

Nothing here does I/O or imports trio.  The I/O layer (:mod:`.runner`) feeds
raw response bytes and timestamps in and reads figures out.

Outcome of one request (first matching rule wins)::

    rule  condition                                       outcome    key
    1     a transport problem or the per-request timeout  failed     the problem
    2     we disconnected before any response head        cancelled  client_disconnect
    3     HTTP status is not 200                          failed     http_<status>
    4     ``data: [DONE]`` arrived                         ok         -
    5     an ``{"error": ...}`` event of type              cancelled  its code (superseded,
          ``stream_cancelled``                                        stopped, ...)
    6     any other ``{"error": ...}`` event               failed     its code or type
    7     we disconnected mid-stream (on purpose)         cancelled  client_disconnect
    8     the body ended without [DONE] or an error       failed     truncated

Integrity (docs/api.md section 5: the mock's reply is a pure function of the
request, and each token is a word that :func:`mocktext.word_index` decodes to
a unique integer).  The text received is split on spaces and decoded; token
``i`` of the reply is ``base + i``.  Then:

* duplicated: an index seen before;
* reordered: an index lower than its predecessor's (and not a duplicate);
* lost: an index of the expected range never seen, where the expected range
  is the whole reply for a request that got ``[DONE]``, and only up to the
  furthest token received for one that was cut early (a prefix);
* foreign: a word that is not the mock's, or outside this reply;
* mismatched: requests whose text is not exactly the reply (or a prefix of it
  ending at a token boundary), whatever the cause.

A "token" is one mock word; an "event" is one SSE data event other than
``[DONE]`` (a coalesced event carrying several words counts once as an event
and several times as tokens).
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from ..upstream import mocktext
from ..wire.sse import SSEDecoder

OutcomeKind = Literal["ok", "failed", "cancelled"]
DISCONNECT = "client_disconnect"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of sorted values, interpolated linearly.

    Matches numpy's default method.  0.0 for no values.
    """
    n = len(sorted_values)
    if n == 0:
        return 0.0
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# -- integrity ---------------------------------------------------------------
@dataclass(slots=True)
class Integrity:
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    foreign: int = 0
    mismatched: int = 0
    checked_requests: int = 0

    def add(self, other: Integrity) -> None:
        self.lost += other.lost
        self.duplicated += other.duplicated
        self.reordered += other.reordered
        self.foreign += other.foreign
        self.mismatched += other.mismatched
        self.checked_requests += other.checked_requests

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.reordered or self.foreign
                    or self.mismatched)  # fmt: skip


def check_reply(
    text: str, messages: Sequence[Any], max_tokens: int | None, *, complete: bool
) -> Integrity:
    """Check one request's received ``text`` against the mock's reply."""
    count = mocktext.reply_length(max_tokens)[0]
    # Tokens are whole words, so a prefix that ends where a token ends is the
    # reply cut after its k-th token, k = the words received.  Only that much
    # is generated: a request cut early costs what it received, not the reply.
    received = text.count(" ") + 1 if text else 0
    want = count if complete else min(received, count)
    exact = text == (mocktext.expected_text(messages, want) if want else "")
    if exact:
        return Integrity(checked_requests=1)
    base = mocktext.prompt_base(messages)
    indices = [mocktext.word_index(w) for w in text.split(" ") if w]
    found = count_anomalies(indices, base, count, complete=complete)
    found.mismatched = 1
    found.checked_requests = 1
    return found


def count_anomalies(
    indices: Sequence[int | None], base: int, count: int, *, complete: bool
) -> Integrity:
    """Lost / duplicated / reordered / foreign among decoded token ``indices``.

    The reply's tokens are ``base .. base + count - 1``; ``None`` is a word
    that did not decode.
    """
    result = Integrity()
    seen: set[int] = set()
    prev: int | None = None
    for idx in indices:
        if idx is None or not base <= idx < base + count:
            result.foreign += 1
            continue
        if idx in seen:
            result.duplicated += 1
        elif prev is not None and idx < prev:
            result.reordered += 1
        seen.add(idx)
        prev = idx
    end = base + count if complete else (max(seen) + 1 if seen else base)
    result.lost = (end - base) - len(seen)
    return result


# -- one reply ---------------------------------------------------------------
class Reply:
    """One request's SSE reply, fed raw bytes from one or more connections.

    More than one connection when a detached run is resumed: call
    :meth:`reconnect` before feeding the second one.  Counters of ``tally``
    (tokens, events, inter-token gaps) move as the bytes arrive, so the live
    display is live.
    """

    def __init__(self, tally: Tally, started: float) -> None:
        self._tally = tally
        self._decoder = SSEDecoder()
        self._parts: list[str] = []
        self.started = started
        self.events = 0
        self.tokens = 0
        self.done = False
        self.error: dict[str, Any] | None = None
        self.protocol_error: str | None = None
        self.last_id: str | None = None
        self.first_token_at: float | None = None
        self._last_token_at: float | None = None

    @property
    def finished(self) -> bool:
        """Nothing more is expected: [DONE], an error event, or garbage."""
        return self.done or self.error is not None or self.protocol_error is not None

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def reconnect(self) -> None:
        """A new connection follows; gaps are not measured across it."""
        self._decoder = SSEDecoder()
        self._last_token_at = None

    def feed(self, data: bytes, now: float) -> None:
        """Account for ``data`` (any slice of the body) received at ``now``."""
        for ev in self._decoder.feed(data):
            if ev.id is not None:
                self.last_id = ev.id
            if self.finished:
                continue
            if ev.data == "[DONE]":
                self.done = True
                continue
            self.events += 1
            self._tally.events += 1
            self._event(ev.data, now)

    def _event(self, data: str, now: float) -> None:
        try:
            obj = orjson.loads(data)
            error = obj.get("error")
            if error is not None:
                self.error = error if isinstance(error, dict) else {"message": str(error)}
                return
            content = obj["choices"][0]["delta"].get("content")
        except (orjson.JSONDecodeError, AttributeError, LookupError, TypeError):
            self.protocol_error = "bad_event"
            return
        if not content:
            return
        self._parts.append(content)
        n = len(content.split())
        self.tokens += n
        self._tally.tokens += n
        if self.first_token_at is None:
            self.first_token_at = now
        elif self._last_token_at is not None:
            self._tally.gaps.append(now - self._last_token_at)
        self._last_token_at = now


@dataclass(slots=True)
class RequestRecord:
    """What the I/O layer learned about one request (one logical run)."""

    number: int
    messages: list[dict[str, Any]]
    max_tokens: int | None
    reply: Reply
    status: int | None = None
    cut: bool = False  # we disconnected on purpose and never came back
    problem: str | None = None  # transport failure kind, or "timeout"
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    kind: OutcomeKind
    key: str | None = None


def classify(record: RequestRecord) -> RequestOutcome:
    """Apply the outcome table of this module's docstring."""
    reply = record.reply
    if record.problem is not None:
        return RequestOutcome("failed", record.problem)
    if record.status is None:
        return (
            RequestOutcome("cancelled", DISCONNECT)
            if record.cut
            else RequestOutcome("failed", "no_response")
        )
    if record.status != 200:
        return RequestOutcome("failed", f"http_{record.status}")
    if reply.done:
        return RequestOutcome("ok")
    if reply.error is not None:
        code = reply.error.get("code") or reply.error.get("type") or "error"
        kind: OutcomeKind = (
            "cancelled" if reply.error.get("type") == "stream_cancelled" else "failed"
        )
        return RequestOutcome(kind, str(code))
    if reply.protocol_error is not None:
        return RequestOutcome("failed", reply.protocol_error)
    if record.cut:
        return RequestOutcome("cancelled", DISCONNECT)
    return RequestOutcome("failed", "truncated")


# -- all requests ------------------------------------------------------------
@dataclass
class Tally:
    """Everything counted over a load run."""

    ok: int = 0
    failed: int = 0
    cancelled: int = 0
    tokens: int = 0
    events: int = 0
    in_flight: int = 0
    resumed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    cancelled_by: Counter[str] = field(default_factory=Counter)
    ttft: list[float] = field(default_factory=list)
    gaps: array[float] = field(default_factory=lambda: array("d"))
    integrity: Integrity = field(default_factory=Integrity)

    @property
    def total(self) -> int:
        return self.ok + self.failed + self.cancelled

    def finish(self, record: RequestRecord) -> RequestOutcome:
        """Count a finished request: its outcome, first-token time, integrity."""
        outcome = classify(record)
        if outcome.kind == "ok":
            self.ok += 1
        elif outcome.kind == "cancelled":
            self.cancelled += 1
            self.cancelled_by[outcome.key or "unknown"] += 1
        else:
            self.failed += 1
            self.errors[outcome.key or "unknown"] += 1
        reply = record.reply
        if reply.first_token_at is not None:
            self.ttft.append(reply.first_token_at - reply.started)
        if record.status == 200:
            self.integrity.add(
                check_reply(reply.text, record.messages, record.max_tokens, complete=reply.done)
            )
        self.resumed += record.resumed
        return outcome

    def side_error(self, key: str) -> None:
        """An error outside any request's outcome (a failed cancel call, say)."""
        self.errors[key] += 1


# -- the server's figures ----------------------------------------------------
@dataclass(frozen=True, slots=True)
class ServerFigures:
    tasks_living: int | None = None
    rss: int | None = None
    active_streams: int | None = None
    active_runs: int | None = None


_METRICS = {
    "trio_stream_tasks_living": "tasks_living",
    "process_resident_memory_bytes": "rss",
    "trio_stream_active_streams": "active_streams",
    "trio_stream_active_runs": "active_runs",
}


def parse_metrics(text: str) -> ServerFigures:
    """The figures we report, from a Prometheus text exposition (missing: None)."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(" ")
        key = _METRICS.get(name.partition("{")[0])
        if key is None:
            continue
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        if math.isfinite(value):
            found[key] = int(value)
    return ServerFigures(**found)


# -- the report --------------------------------------------------------------
def _ms(values: Sequence[float], *qs: float) -> dict[str, float]:
    ordered = sorted(values)
    out = {f"p{q:g}": round(percentile(ordered, q) * 1000, 3) for q in qs}
    out["max"] = round(ordered[-1] * 1000, 3) if ordered else 0.0
    out["n"] = len(ordered)
    return out


def build_report(
    *, scenario: str, http2: bool, concurrency: int, wall_s: float, tally: Tally,
    before: ServerFigures, after: ServerFigures, cpu_s: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The final report, in the shape other tools parse (keys may be added, never renamed)."""
    wall = max(wall_s, 1e-9)
    ttft = _ms(tally.ttft, 50, 90, 99)
    gaps = _ms(tally.gaps, 50, 99)
    integrity = tally.integrity
    report: dict[str, Any] = {
        "scenario": scenario,
        "http2": http2,
        "concurrency": concurrency,
        "wall_s": round(wall_s, 3),
        "requests": {
            "total": tally.total,
            "ok": tally.ok,
            "failed": tally.failed,
            "cancelled": tally.cancelled,
        },
        "tokens": tally.tokens,
        "events": tally.events,
        "tokens_per_s": round(tally.tokens / wall, 1),
        "events_per_s": round(tally.events / wall, 1),
        "requests_per_s": round(tally.total / wall, 1),
        "ttft_ms": ttft,
        "gap_ms": {"p50": gaps["p50"], "p99": gaps["p99"], "n": gaps["n"]},
        "integrity": {
            "lost": integrity.lost,
            "duplicated": integrity.duplicated,
            "reordered": integrity.reordered,
            "checked_requests": integrity.checked_requests,
            "foreign": integrity.foreign,
            "mismatched": integrity.mismatched,
        },
        "server": {
            "tasks_living_before": before.tasks_living,
            "tasks_living_after": after.tasks_living,
            "rss_before": before.rss,
            "rss_after": after.rss,
        },
        "client": {"cpu_s": round(cpu_s, 3), "cpu_percent": round(100.0 * cpu_s / wall, 1)},
        "errors": dict(sorted(tally.errors.items())),
        "cancelled_by": dict(sorted(tally.cancelled_by.items())),
        "resumed": tally.resumed,
    }
    report.update(extra or {})
    return report
