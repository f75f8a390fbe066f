"""The ``[[key]]`` tables of ``--config FILE``: read at start, reloaded on
``SIGHUP`` without dropping a stream, and a bad file refused whole."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
import trio

from tests.conftest import ServeProcess, serve_process
from tests.redis_server import RedisServer
from trio_stream.errors import ConfigError
from trio_stream.http.service import Auth
from trio_stream.limits.file import load_keys, read_keys
from trio_stream.limits.keys import digest_of

ALICE = '[[key]]\nname = "alice"\nsecret = "sk-alice"\nrpm = 1000\n'
CAROL = '[[key]]\nname = "carol"\nsecret = "sk-carol"\ntenant = "c"\n'


def test_a_reload_never_opens_access_or_shares_an_api_key() -> None:
    """A reload that would leave no key at all (no ``--api-key``) is refused,
    so is a ``[[key]]`` whose secret is also an ``--api-key`` key; the keys
    in force stay."""
    auth = Auth((), read_keys(ALICE, "k.toml"))
    with pytest.raises(ConfigError, match="refusing to open access"):
        auth.reload(())
    assert auth.tenant("Bearer sk-alice") == "alice"
    with pytest.raises(ConfigError, match="also given with --api-key"):
        Auth(("sk-alice",), read_keys(ALICE, "k.toml"))
    assert Auth((), ()).open  # no key ever: open (loopback only, checked at start)


def test_the_file_is_read_and_a_bad_one_named() -> None:
    """The file's ``[[key]]`` tables become keys; a file that is not TOML, a
    bad key, or a missing file is a :class:`ConfigError` naming the file
    (and the key's number and field)."""
    (alice,) = read_keys(ALICE, "k.toml")
    assert (alice.name, alice.digest, alice.limits.rpm) == ("alice", digest_of("sk-alice"), 1000)
    assert read_keys("", "k.toml") == ()
    with pytest.raises(ConfigError, match=r"k\.toml: not valid TOML"):
        read_keys("[[key]\n", "k.toml")
    with pytest.raises(ConfigError, match=r"k\.toml: key 2 \('carol'\): rpm must be"):
        read_keys(ALICE + CAROL + "rpm = 0\n", "k.toml")
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot be read"):
        load_keys("nope.toml")


async def test_a_bad_file_stops_the_server_at_start(tmp_path: Path) -> None:
    """``serve --config`` with a bad key exits with status 2 and names it,
    before anything listens."""
    path = tmp_path / "bad.toml"
    path.write_text(ALICE + "tpm = -1\n")
    result = await trio.run_process(
        [sys.executable, "-m", "trio_stream", "serve", "--port", "0", "--config", str(path)],
        capture_stderr=True, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2
    assert b"tpm must be a whole number" in result.stderr


async def test_sighup_reloads_keys_under_load_and_refuses_a_bad_file(tmp_path: Path) -> None:
    """``SIGHUP`` puts the file's new keys in force (a removed key is refused,
    an added one admitted) while streams of the removed key go on to their
    end, every token delivered; a bad file is refused whole and the keys in
    force stay."""
    path = tmp_path / "keys.toml"
    path.write_text(ALICE)
    args = ("--port", "0", "--config", str(path), "--log-format", "json",
            "--mock-delay-ms", "20", "--db", str(tmp_path / "db.sqlite"))  # fmt: skip
    async with serve_process(*args) as proc:
        url = f"http://127.0.0.1:{proc.port}/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        long = {**body, "stream": True, "max_tokens": 60}
        async with httpx.AsyncClient(timeout=30) as client:

            def auth(secret: str) -> dict[str, str]:
                return {"authorization": f"Bearer {secret}"}

            texts: list[str] = []

            async def stream() -> None:
                async with client.stream("POST", url, json=long, headers=auth("sk-alice")) as r:
                    assert r.status_code == 200
                    texts.append((await r.aread()).decode())

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(stream)
                await trio.sleep(0.3)  # the streams are under way
                assert (
                    await client.post(url, json=body, headers=auth("sk-carol"))
                ).status_code == 401
                path.write_text(CAROL)
                proc.process.send_signal(signal.SIGHUP)
                with trio.fail_after(10):
                    await proc.wait_for_line(lambda line: '"keys_reloaded"' in line)
                assert not texts  # the reload landed while every stream was running
                assert (
                    await client.post(url, json=body, headers=auth("sk-carol"))
                ).status_code == 200
                assert (
                    await client.post(url, json=body, headers=auth("sk-alice"))
                ).status_code == 401
            assert len(texts) == 5
            for text in texts:  # none dropped: each ran to its end
                assert text.rstrip().endswith("data: [DONE]")
                chunks = [orjson.loads(line[6:]) for line in text.splitlines()
                          if line.startswith("data: {")]  # fmt: skip
                assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            path.write_text(CAROL + "rpm = 0\n")
            proc.process.send_signal(signal.SIGHUP)
            with trio.fail_after(10):
                line = await proc.wait_for_line(lambda line: '"keys_reload_refused"' in line)
            assert "rpm must be a whole number" in line
            assert (await client.post(url, json=body, headers=auth("sk-carol"))).status_code == 200
        proc.process.send_signal(signal.SIGTERM)
        assert await proc.wait_exit() == 0
    assert "sk-carol" not in "\n".join(proc.lines)
    assert "sk-alice" not in "\n".join(proc.lines)


async def lines(proc: ServeProcess, event: str, count: int) -> None:
    """Wait until ``count`` stderr lines of ``event`` were written."""
    while sum(line.startswith(event) for line in proc.lines) < count:
        assert not proc.eof.is_set(), "\n".join(proc.lines)
        await proc._changed.wait()


async def test_workers_share_the_limits_and_each_reloads_on_sighup(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    """``--workers 2`` with ``--redis`` and a key with ``rpm = 60``: 100
    requests on fresh connections (spread over the workers by the kernel)
    are admitted exactly 60 times; ``SIGHUP`` to the supervisor reaches every
    worker, each of which reloads its keys."""
    path = tmp_path / "keys.toml"
    path.write_text('[[key]]\nname = "alice"\nsecret = "sk-alice"\nrpm = 60\n')
    args = ("--workers", "2", "--redis", own_redis.url, "--port", "0", "--config", str(path),
            "--db", str(tmp_path / "w.db"), "--mock-delay-ms", "1",
            "--graceful-timeout", "1")  # fmt: skip
    with trio.fail_after(60):
        async with serve_process(*args) as proc:
            await lines(proc, "worker_started", 2)
            url = f"http://127.0.0.1:{proc.port}/v1/chat/completions"
            body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
            answers: list[httpx.Response] = []
            fresh = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=30, limits=fresh) as client:

                async def send() -> None:
                    answer = await client.post(
                        url, json=body, headers={"authorization": "Bearer sk-alice"}
                    )
                    answers.append(answer)

                start = time.monotonic()
                async with trio.open_nursery() as nursery:
                    for _ in range(100):
                        nursery.start_soon(send)
                now = time.monotonic()
            assert sorted(a.status_code for a in answers) == [200] * 60 + [429] * 40
            for answer in answers:
                assert answer.headers["x-ratelimit-limit-requests"] == "60"
                if answer.status_code == 429:
                    # the window frees between start + 60 and now + 60, in whole seconds
                    assert 60 - (now - start) - 1 <= int(answer.headers["retry-after"]) <= 61
            proc.process.send_signal(signal.SIGHUP)
            await lines(proc, "keys_reloaded", 2)
            proc.process.send_signal(signal.SIGTERM)
            assert await proc.wait_exit() == 0


def test_keys_live_beside_the_other_tables_of_the_file() -> None:
    """One file holds ``[serve]`` (the limits' options among them),
    ``[[upstream]]`` and ``[[key]]``: the configuration loader accepts the key
    tables and leaves them to the key loader, which reads only them."""
    from trio_stream.config.file import parse

    text = (
        '[serve]\nlimits_on_outage = "open"\nlimits_redis = "redis://127.0.0.1:1/0"\n'
        '[[upstream]]\nname = "m"\nkind = "mock"\nmodels = ["*"]\n' + ALICE
    )
    config = parse(text, "all.toml")
    assert dict(config.serve) == {
        "limits_on_outage": "open", "limits_redis": "redis://127.0.0.1:1/0",
    }  # fmt: skip
    assert [k.name for k in read_keys(text, "all.toml")] == ["alice"]
