"""``kill -9`` one of three upstream members under ``trio-stream load --scenario mixed``.

Every process is real: three ``tools/fake_openai.py`` servers (the mock's
reply at 20 ms a token, so each stream lasts about 0.7 s), a
``trio-stream serve --config`` process whose one group is the three of them,
and ``trio-stream load --scenario mixed`` (steady, disconnect, supersede,
stop, resume, slow readers) against it.  Once every member has streams in
flight, one member is sent SIGKILL: its connections die mid-answer and its
port then refuses.  Its cooldowns are short (100-300 ms), so it is probed
again and again during the load: each probe is refused and fails over.

The invariants (docs/api.md section 1.3), from the load's report, the
server's JSON log and its SQLite file:

* no request that had not yet received a token fails: every request the
  load counts as failed ended with the ``upstream_error`` event, and every
  failed run (``stream_end``) was served by the dead member and had streamed
  tokens before it died;
* those runs are saved once, as what they streamed (no save failed, none
  refused as a duplicate, a row for each, ``served_by`` the dead member);
* the load finds no lost, duplicated, reordered or foreign token;
* the server's ``tasks_living`` is back at its idle baseline.

A second test kills a member while streams wait for their FIRST token on
it (``fake_openai.py --first-token-ms``: the response's headers came, no
token will): those requests must move to another member and complete, each
client seeing one whole answer, each run saved once, ``served_by`` the
member that answered, tasks back to baseline.

The tests stop by themselves (``fail_after``); they kill only the processes
they started, by their own handles.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio

from tests.conftest import ServeProcess, serve_process

ROOT = Path(__file__).resolve().parent.parent
MEMBERS = ("m1", "m2", "m3")
DEAD = "m2"
DELAY_MS = 20
MAX_TOKENS = 32


@asynccontextmanager
async def fake_process(*options: str) -> AsyncIterator[tuple[trio.Process, int]]:
    """A ``tools/fake_openai.py`` process on a free port (``options``: more of
    its options): it and its port.  Killed (if still alive) and reaped on exit."""
    cmd = [sys.executable, str(ROOT / "tools" / "fake_openai.py"), "--port", "0",
           "--delay-ms", str(DELAY_MS), *options]  # fmt: skip
    process = await trio.lowlevel.open_process(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert process.stdout is not None
        line = b""
        while b"\n" not in line:
            chunk = await process.stdout.receive_some(256)
            assert chunk, "the fake upstream exited before listening"
            line += chunk
        found = re.search(rb"listening port=(\d+)", line)
        assert found is not None, line
        yield process, int(found[1])
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


def config(ports: list[int], serve: str = "") -> str:
    tables = [
        f'[[upstream]]\nname = "{name}"\nkind = "openai"\n'
        f'url = "http://127.0.0.1:{port}/v1"\nmodels = ["mock"]\n'
        "cooldown_ms = 100\nmax_cooldown_ms = 300\n"  # probed again and again during the load
        for name, port in zip(MEMBERS, ports, strict=True)
    ]
    return "\n".join([*([f"[serve]\n{serve}"] if serve else []), *tables])


async def scrape(port: int) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://127.0.0.1:{port}/metrics")).text


def gauge(text: str, name: str, **labels: str) -> float:
    label = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name + (f"{{{label}}}" if label else "")) + r" (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found[1]) if found else 0.0


async def settled_tasks(port: int) -> float:
    """``tasks_living`` once two scrapes 50 ms apart agree."""
    last = gauge(await scrape(port), "trio_stream_tasks_living")
    while True:
        await trio.sleep(0.05)  # another process: nothing to wait on but its scrape
        now = gauge(await scrape(port), "trio_stream_tasks_living")
        if now == last:
            return now
        last = now


async def run_load(port: int, report: Path) -> int:
    args = [sys.executable, "-m", "trio_stream", "load", "--url", f"http://127.0.0.1:{port}",
            "--scenario", "mixed", "-c", "16", "-n", "150", "--max-tokens", str(MAX_TOKENS),
            "--seed", "21", "--timeout", "30", "--json", str(report), "-q"]  # fmt: skip
    result = await trio.run_process(args, stdout=subprocess.DEVNULL, check=False)
    return result.returncode


def saved_rows(db: Path) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT run_id, status, content, events, served_by FROM messages")
        return {r["run_id"]: dict(r) for r in rows}


async def kill_when_busy(server: ServeProcess, fakes: dict[str, trio.Process]) -> None:
    """SIGKILL the DEAD member once every member has had two streams in
    flight for 0.2 s (ten tokens: they are mid-answer)."""
    while True:
        text = await scrape(server.port)
        if all(gauge(text, "trio_stream_upstream_in_flight", member=m) >= 2 for m in MEMBERS):
            break
        await trio.sleep(0.02)  # another process: nothing to wait on but its scrape
    await trio.sleep(0.2)  # the first batch of streams is a third through its answers
    fakes[DEAD].kill()  # SIGKILL, to this pid only


async def test_kill_9_one_member_under_mixed_load(tmp_path: Path) -> None:
    """Module docstring: a member killed mid-load fails only the runs it was
    answering (each after some tokens, saved once), no request without a
    token fails, no token is lost, and the server's tasks return to baseline."""
    db = tmp_path / "kill.db"
    report = tmp_path / "load.json"
    with trio.fail_after(120):
        async with (
            fake_process() as (p1, port1),
            fake_process() as (p2, port2),
            fake_process() as (p3, port3),
        ):
            fakes = dict(zip(MEMBERS, (p1, p2, p3), strict=True))
            path = tmp_path / "config.toml"
            path.write_text(config([port1, port2, port3]))
            args = ["--config", str(path), "--port", "0", "--db", str(db), "--log-format",
                    "json", "--graceful-timeout", "2"]  # fmt: skip
            async with serve_process(*args) as server:
                baseline = await settled_tasks(server.port)
                load_exit: list[int] = []

                async def load() -> None:
                    load_exit.append(await run_load(server.port, report))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(load)
                    await kill_when_busy(server, fakes)
                assert await fakes[DEAD].wait() == -9
                figures = orjson.loads(report.read_bytes())
                assert load_exit == [0], figures
                while await settled_tasks(server.port) != baseline:  # noqa: ASYNC110
                    await trio.sleep(0.1)
                metrics = await scrape(server.port)
                server.process.terminate()
                assert await server.wait_exit() == 0

    integrity = figures["integrity"]
    assert integrity["lost"] == integrity["duplicated"] == integrity["reordered"] == 0, figures
    assert integrity["foreign"] == 0, figures
    # No request without a token failed: the only failures are the error event.
    assert set(figures["errors"]) <= {"upstream_error"}, figures
    failed_requests = figures["requests"]["failed"]

    ends = {r["trace"]: r for r in server.records("stream_end")}
    failed = {t: r for t, r in ends.items() if r["status"] == "failed"}
    assert failed, ("the kill hit no stream mid-answer", server.records("upstream_failed"))
    assert failed_requests <= len(failed)
    for end in failed.values():
        assert end["served_by"] == DEAD, end
        assert end["tokens"] > 0, end  # it had streamed before the member died
    served = {r["served_by"] for r in ends.values()}
    assert served <= set(MEMBERS), served
    # Saved once: every failed run has its row, none failed or came twice.
    rows = saved_rows(db)
    for trace, end in failed.items():
        row = rows[trace]
        assert row["served_by"] == DEAD, row
        assert row["events"] == end["tokens"], (row, end)
    assert server.records("save_failed") == []
    assert server.records("save_duplicate_refused") == []
    assert server.records("run_crashed") == []
    assert len(rows) == len({r["run_id"] for r in rows.values()})
    # The dead member was found out: counted broken, then probed after each
    # cooldown, refused, and the request moved on (the path this test is for).
    assert gauge(metrics, "trio_stream_upstream_attempts_total", member=DEAD,
                 outcome="broken") >= len(failed)  # fmt: skip
    assert gauge(metrics, "trio_stream_upstream_attempts_total", member=DEAD,
                 outcome="connect") >= 2  # fmt: skip
    assert gauge(metrics, "trio_stream_upstream_failovers_total", member=DEAD) >= 2
    for name in MEMBERS:
        assert gauge(metrics, "trio_stream_upstream_in_flight", member=name) == 0


#: The dead member's wait for its first token: longer than the test.
NEVER_MS = 600_000
#: Streams sent at once in the first-token test; about a third go to DEAD.
WAITING_STREAMS = 12


async def read_stream(port: int) -> dict[str, Any]:
    """One streamed chat completion, read to its end: its status, the
    content deltas, the error events, whether ``[DONE]`` came."""
    body = {"model": "mock", "stream": True, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": "first token"}]}  # fmt: skip
    got: dict[str, Any] = {"deltas": 0, "errors": [], "done": False}
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r,
    ):
        got["status"] = r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                got["done"] = True
                continue
            event = orjson.loads(line[6:])
            if "error" in event:
                got["errors"].append(event["error"])
            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                got["deltas"] += 1
    return got


async def test_kill_9_member_while_streams_wait_for_their_first_token(tmp_path: Path) -> None:
    """No request that had not yet received a token fails, also when it was
    waiting for its first token on the member that died: ``kill -9`` of a
    member (DEAD, whose first token never comes: the response's headers did,
    so its connections are open and silent) with several streams pending on
    it breaks their connections; each of those requests moves to another
    member (F1: a broken connection before the first token is CONNECT) and
    the client sees one complete answer.  Every run is saved exactly once,
    ``served_by`` (log line and row) names the member that answered, never
    DEAD, and the server's tasks return to their baseline."""
    db = tmp_path / "first-token.db"
    with trio.fail_after(60):
        async with (
            fake_process() as (p1, port1),
            fake_process("--first-token-ms", str(NEVER_MS)) as (p2, port2),
            fake_process() as (p3, port3),
        ):
            fakes = dict(zip(MEMBERS, (p1, p2, p3), strict=True))
            path = tmp_path / "config.toml"
            # The request's own first-token deadline is far: only the kill moves them.
            path.write_text(config([port1, port2, port3], "first_token_timeout = 50\n"))
            args = ["--config", str(path), "--port", "0", "--db", str(db), "--log-format",
                    "json", "--graceful-timeout", "2"]  # fmt: skip
            async with serve_process(*args) as server:
                baseline = await settled_tasks(server.port)
                answers: list[dict[str, Any]] = []

                async def one() -> None:
                    answers.append(await read_stream(server.port))

                async with trio.open_nursery() as nursery:
                    for _ in range(WAITING_STREAMS):
                        nursery.start_soon(one)
                    while True:  # until DEAD holds three streams, none with a token
                        text = await scrape(server.port)
                        waiting = gauge(text, "trio_stream_upstream_in_flight", member=DEAD)
                        if waiting >= 3:
                            break
                        await trio.sleep(0.01)  # another process: nothing to wait on but its scrape
                    assert gauge(text, "trio_stream_upstream_attempts_total", member=DEAD,
                                 outcome="first_token") == 0  # fmt: skip
                    fakes[DEAD].kill()  # SIGKILL, to this pid only
                assert await fakes[DEAD].wait() == -9
                while await settled_tasks(server.port) != baseline:  # noqa: ASYNC110
                    await trio.sleep(0.1)
                metrics = await scrape(server.port)
                server.process.terminate()
                assert await server.wait_exit() == 0

    # The client saw one complete answer per request: no error, no missing token.
    assert len(answers) == WAITING_STREAMS
    for answer in answers:
        assert answer == {"status": 200, "deltas": MAX_TOKENS, "errors": [], "done": True}
    # The requests that waited on DEAD: its connections broke before their first token.
    moved = {r["trace"] for r in server.records("upstream_failed") if r["member"] == DEAD}
    assert len(moved) >= waiting, server.records("upstream_failed")
    assert {r["failure"] for r in server.records("upstream_failed")} == {"connect"}
    assert gauge(metrics, "trio_stream_upstream_failovers_total", member=DEAD) >= waiting
    # Each run ended complete, served by the member that answered it, saved once.
    ends = {r["trace"]: r for r in server.records("stream_end")}
    assert len(ends) == WAITING_STREAMS
    assert moved <= ends.keys()
    rows = saved_rows(db)
    assert rows.keys() == ends.keys()
    for trace, end in ends.items():
        assert end["status"] == "completed", end
        assert end["served_by"] in set(MEMBERS) - {DEAD}, end
        assert rows[trace]["served_by"] == end["served_by"], (rows[trace], end)
        assert rows[trace]["events"] == end["tokens"], (rows[trace], end)
    assert server.records("save_failed") == []
    assert server.records("save_duplicate_refused") == []
    assert server.records("run_crashed") == []
    for name in MEMBERS:
        assert gauge(metrics, "trio_stream_upstream_in_flight", member=name) == 0
