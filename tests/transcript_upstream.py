"""A fake upstream that replays transcripts byte for byte over a real socket.

It is :class:`~tests.fakes.FakeUpstream` (a real HTTP/1.1 server on
127.0.0.1, trio + h11) following a plan made from a transcript
(:mod:`tests.transcript_format`): the transcript's status, its headers in
order, and its body cut where a server flushes (after each SSE event or NDJSON
line), optionally paced.  The body reaches the client exactly as recorded;
only the HTTP framing is the fake's (``transfer-encoding: chunked`` unless the
transcript gives a ``content-length``).

The fake answers every POST with the plan, whatever its path (a GET gets
its model list); the path each request used is recorded, so a test checks it.
Every request is recorded by the fake: ``fake.exchanges[i].request`` (parsed
JSON), ``.raw`` (the body bytes), ``.target`` (the path) and ``.headers``, so
a test can check what trio-stream forwarded (``stream_options`` and the rest).

Usage::

    fake = replaying(by_name("vllm_tool_calls"))
    port = await nursery.start(fake.serve)
    # point trio-stream at fake.url (…/v1 for OpenAI-style, the root for Ollama)

``replaying(t1, t2)`` answers the first request with ``t1``, the second and
every later one with ``t2`` (a 429 then a success, say).
"""

from __future__ import annotations

from typing import Any

from tests.fakes import FakeUpstream, Plan, Step
from tests.transcript_format import Transcript, steps


def replay_plan(t: Transcript, *, delay: float | None = None, piece: int | None = None) -> Plan:
    """The plan that sends ``t``: its status and head, then its body.

    ``delay`` (default: the transcript's ``[replay] delay``) is slept before
    each flush.  ``piece`` re-cuts the body into pieces of that many bytes
    instead, to put read boundaries inside events and inside UTF-8 sequences.
    """
    wait = t.delay if delay is None else delay
    if piece is None:
        parts = steps(t)
    else:
        assert piece > 0
        parts = [t.body[i : i + piece] for i in range(0, len(t.body), piece)]
    content_type = t.header("content-type") or "application/octet-stream"
    return Plan(
        status=t.status,
        steps=[Step(part, wait) for part in parts],
        content_type=content_type,
        headers=list(t.headers),
    )


def fmt_of(t: Transcript) -> str:
    """``"ollama"`` for ``/api/chat`` transcripts, else ``"openai"`` (FakeUpstream's url)."""
    return "ollama" if t.path == "/api/chat" else "openai"


def replaying(
    *transcripts: Transcript, delay: float | None = None, piece: int | None = None
) -> FakeUpstream:
    """A FakeUpstream answering request *i* with ``transcripts[min(i, len - 1)]``.

    All transcripts must share one API (OpenAI-style or Ollama).  Requests are
    numbered by arrival; the plan is chosen when a request's body is complete.
    """
    assert transcripts, "give at least one transcript"
    fmts = {fmt_of(t) for t in transcripts}
    assert len(fmts) == 1, f"transcripts of different APIs: {fmts}"
    plans = [replay_plan(t, delay=delay, piece=piece) for t in transcripts]
    served = 0

    def plan(_request: dict[str, Any]) -> Plan:
        nonlocal served
        chosen = plans[min(served, len(plans) - 1)]
        served += 1
        return chosen

    return FakeUpstream(fmts.pop(), plan=plan)


def forwarded(fake: FakeUpstream) -> list[dict[str, Any]]:
    """The parsed bodies of the completion requests the fake received, in order."""
    paths = (b"/v1/chat/completions", b"/api/chat")
    return [e.request for e in fake.exchanges if e.target in paths]
