"""The limiter's pipelined Redis connection (trio_stream/limits/resp.py):
RESP encoding and parsing (hiredis, as the connection uses it), and on a
real Redis, replies matched to their calls however many share the
connection and whichever are cancelled; a broken connection fails its
waiting calls at once and the next call opens a new one."""

from __future__ import annotations

import pytest
import trio

from tests.redis_server import RedisServer
from trio_stream.limits import resp
from trio_stream.limits.base import LimitsUnavailable
from trio_stream.limits.resp import (
    INCOMPLETE,
    Address,
    Pipe,
    ReplyError,
    Script,
    encode,
    reply_reader,
)


def test_encode_and_parse_every_reply_kind() -> None:
    """A command is an array of bulk strings; each RESP2 reply kind parses to
    its value (an error reply to a ReplyError value, not raised), a reply cut
    anywhere is incomplete (never a wrong value), and bytes that are not
    RESP are refused as ValueError (which breaks the connection)."""
    assert encode(("EVALSHA", "ab", "1", "k")) == (
        b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$1\r\nk\r\n"
    )
    assert encode(("SET", "é")) == b"*2\r\n$3\r\nSET\r\n$2\r\n\xc3\xa9\r\n"
    first = b"*5\r\n$2\r\nok\r\n:-3\r\n$-1\r\n*1\r\n+OK\r\n$0\r\n\r\n"
    reader = reply_reader()
    reader.feed(first + b"-ERR x\r\n")
    assert reader.gets() == ["ok", -3, None, ["OK"], ""]
    error = reader.gets()
    assert isinstance(error, ReplyError)
    assert str(error) == "ERR x"
    assert reader.gets() is INCOMPLETE
    for cut in range(1, len(first)):
        reader = reply_reader()
        reader.feed(first[:cut])
        assert reader.gets() is INCOMPLETE
        reader.feed(first[cut:])  # the rest completes it, exactly
        assert reader.gets() == ["ok", -3, None, ["OK"], ""]
    reader = reply_reader()
    reader.feed(b"?what\r\n")
    with pytest.raises(ValueError, match="Protocol error"):
        reader.gets()


def test_addresses() -> None:
    """redis://, rediss:// and unix:// URLs, with credentials and a database."""
    assert Address.parse("redis://127.0.0.1:6390/2") == Address("127.0.0.1", 6390, db=2)
    assert Address.parse("rediss://u:p%40ss@h/0") == Address(
        "h", 6379, tls=True, username="u", password="p@ss"
    )
    assert Address.parse("redis://:pw@h:1") == Address("h", 1, password="pw")
    assert Address.parse("unix:///run/r.sock?db=3") == Address(path="/run/r.sock", db=3)
    with pytest.raises(ValueError, match="not a Redis URL"):
        Address.parse("http://h")


async def test_replies_stay_matched_under_cancellation(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """200 concurrent calls share one connection; every other caller is
    cancelled right after queueing its command.  Each call that completes
    gets its own reply, and a script runs by EVALSHA (EVAL the first time)."""
    pipe = Pipe(redis_server.url)
    await nursery.start(pipe.run)
    got: dict[int, str] = {}

    async def echo(i: int) -> None:
        got[i] = await pipe.call("ECHO", f"v{i}")

    async with trio.open_nursery() as calls:
        for i in range(200):
            if i % 2:
                with trio.CancelScope() as cs:
                    cs.cancel()
                    await echo(i)  # queued, then cancelled at its wait
            else:
                calls.start_soon(echo, i)
    assert got == {i: f"v{i}" for i in range(0, 200, 2)}
    script = Script("return {KEYS[1], ARGV[1]}")
    for _ in range(2):
        assert await pipe.script(script, ["k"], ["a"]) == ["k", "a"]
    with pytest.raises(ReplyError):
        await pipe.call("NOSUCHCOMMAND")
    assert await pipe.call("ECHO", "after") == "after"


async def test_a_broken_connection_fails_its_calls_and_the_next_reconnects(
    own_redis: RedisServer, nursery: trio.Nursery
) -> None:
    """Redis killed with a call waiting (BLPOP holds its reply): the call
    fails with LimitsUnavailable at once; with Redis back, the next call
    opens a new connection and succeeds."""
    pipe = Pipe(own_redis.url)
    await nursery.start(pipe.run)
    assert await pipe.call("PING") == "PONG"
    failed = trio.Event()

    async def waiting() -> None:
        with pytest.raises(LimitsUnavailable):
            await pipe.call("BLPOP", "nothing", "30")
        failed.set()

    nursery.start_soon(waiting)
    await trio.sleep(0.2)
    own_redis.kill()
    with trio.fail_after(2):
        await failed.wait()
    with pytest.raises(LimitsUnavailable):
        await pipe.call("PING")  # refused: nothing listens
    own_redis.start()
    assert await pipe.call("PING") == "PONG"


async def test_a_login_and_a_database_are_sent_first_and_a_bad_login_fails(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """``/3`` selects database 3 before any call (a key set there is not in
    database 0); a password Redis refuses fails the call with
    LimitsUnavailable, and so does the next one (no half-logged-in
    connection is kept)."""
    three, zero = Pipe(redis_server.url[: -len("/0")] + "/3"), Pipe(redis_server.url)
    for pipe in (three, zero):
        await nursery.start(pipe.run)
    assert await three.call("SET", "resp:db", "3") == "OK"
    assert await three.call("GET", "resp:db") == "3"
    assert await zero.call("GET", "resp:db") is None
    wrong = Pipe(redis_server.url.replace("redis://", "redis://:wrong@"))
    await nursery.start(wrong.run)
    for _ in range(2):
        with pytest.raises(LimitsUnavailable):
            await wrong.call("PING")


async def test_a_redis_that_stopped_answering_is_dropped(
    own_redis: RedisServer, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis stopped (SIGSTOP: the connection stays open, nothing answers):
    once the oldest call has waited ``STALL`` seconds, the next call drops
    the connection -- the calls waiting on it fail at once -- and opens a
    new one, which answers when Redis resumes."""
    monkeypatch.setattr(resp, "STALL", 0.3)
    pipe = Pipe(own_redis.url)
    await nursery.start(pipe.run)
    assert await pipe.call("PING") == "PONG"
    old = pipe._link
    own_redis.process.send_signal(19)  # SIGSTOP, by its own pid
    try:
        failed = trio.Event()

        async def waiting() -> None:
            with pytest.raises(LimitsUnavailable):
                await pipe.call("ECHO", "lost")
            failed.set()

        nursery.start_soon(waiting)
        await trio.sleep(0.5)
        with trio.move_on_after(0.2):
            await pipe.call("ECHO", "next")  # drops the stalled connection, then waits
        with trio.fail_after(1):
            await failed.wait()
        assert pipe._link is not old
    finally:
        own_redis.process.send_signal(18)  # SIGCONT
    with trio.fail_after(5):
        assert await pipe.call("ECHO", "back") == "back"
