"""API keys (issue 6, docs/api.md section 2.1): isolation, secrecy, and no open access
on a network.

* Each key is its own tenant: runs, sessions and messages of one key are
  invisible (404) and untouchable by another.
* A key never appears in a log line (text or JSON, ours or hypercorn's).
* With no key configured the server refuses a non-loopback bind address,
  before it binds anything.
* ``TRIO_STREAM_API_KEYS=k1,k2`` configures keys for the command line.
* Keys are compared with ``hmac.compare_digest``, against every configured
  key, with no early exit.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from tests.conftest import serve_process
from trio_stream import (
    ApiError,
    ConfigError,
    EventLogger,
    RecordingSink,
    Settings,
    open_service,
    serve_service,
)
from trio_stream.core.log import RunStatus
from trio_stream.http.service import Auth, Service
from trio_stream.upstream import mocktext

KEY_A = "sk-alpha-5c0ffee-7d1e4b9a"
KEY_B = "sk-bravo-0badf00d-93a2c6e1"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "whose run is it"}]


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def keyed_settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(
        port=0, db=str(tmp_path / "keys.db"), api_keys=(KEY_A, KEY_B), mock_delay_ms=5, **kw
    )


@asynccontextmanager
async def logged_server(
    settings: Settings, text: io.StringIO
) -> AsyncIterator[tuple[Service, httpx.AsyncClient, RecordingSink]]:
    """A real server whose log lines are written to ``text``; yields a client."""
    sink = RecordingSink()
    logger = EventLogger(settings.log_format, stream=text, sink=sink)
    async with (
        open_service(settings, logger=logger) as service,
        trio.open_nursery() as nursery,
    ):
        port = await nursery.start(partial(serve_service, service))
        # Plain HTTP to 127.0.0.1: verify=False only skips loading the CA bundle.
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10, verify=False)
        async with client:
            yield service, client, sink
        nursery.cancel_scope.cancel()


async def start_detached(client: httpx.AsyncClient, key: str, session: str) -> str:
    """Start a long detached run; return its id once its first event arrived."""
    body = {"messages": MESSAGES, "stream": True, "max_tokens": 100_000, "detach": True}
    headers = {**bearer(key), "x-session-id": session}
    async with client.stream("POST", CHAT, json=body, headers=headers) as r:
        assert r.status_code == 200
        return r.headers["x-run-id"]


async def complete(client: httpx.AsyncClient, key: str, session: str) -> str:
    """Run a short attached completion to the end; return its run id."""
    body = {"messages": MESSAGES, "max_tokens": 5}
    r = await client.post(CHAT, json=body, headers={**bearer(key), "x-session-id": session})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == mocktext.expected_text(MESSAGES, 5)
    return r.headers["x-run-id"]


async def test_runs_sessions_and_messages_are_strictly_per_key(tmp_path: Path) -> None:
    """Key B can neither see, follow, cancel nor interrupt key A's run, nor
    list A's session; using the same session id, B gets its own session and
    does not supersede A's run; each key lists only its own messages."""
    with trio.fail_after(20):
        async with logged_server(keyed_settings(tmp_path), io.StringIO()) as (service, client, _):
            a_run = await start_detached(client, KEY_A, "shared")
            b = bearer(KEY_B)
            for method, path in [
                ("GET", f"/v1/runs/{a_run}"),
                ("GET", f"/v1/runs/{a_run}/events"),
                ("POST", f"/v1/runs/{a_run}/cancel"),
                ("POST", "/v1/sessions/shared/interrupt"),
                ("GET", "/v1/sessions/shared/messages"),
            ]:
                r = await client.request(method, path, headers=b)
                assert r.status_code == 404, (method, path, r.text)
                assert r.json()["error"]["type"] == "not_found_error"

            b_run = await complete(client, KEY_B, "shared")  # same session id, other key
            run = service.runs.runs[a_run]
            assert run.log.status is RunStatus.RUNNING  # not superseded, stopped or interrupted

            r = await client.post(f"/v1/runs/{a_run}/cancel", headers=bearer(KEY_A))
            assert r.status_code == 200
            await run.done.wait()
            a_rows = await client.get("/v1/sessions/shared/messages", headers=bearer(KEY_A))
            b_rows = await client.get("/v1/sessions/shared/messages", headers=b)
            assert [m["run_id"] for m in a_rows.json()["data"]] == [a_run]
            assert [m["run_id"] for m in b_rows.json()["data"]] == [b_run]
            assert a_rows.json()["data"][0]["reason"] == "stopped"
            # Finished runs are served from the store, still per key.
            assert (await client.get(f"/v1/runs/{b_run}", headers=bearer(KEY_A))).status_code == 404
            assert (await client.get(f"/v1/runs/{a_run}", headers=b)).status_code == 404
            assert (await client.get(f"/v1/runs/{b_run}", headers=b)).status_code == 200


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_keys_never_appear_in_any_log_line(
    tmp_path: Path, log_format: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither a configured key nor a wrong key a client sent shows up in any
    log line: our lifecycle lines (text or JSON) or Python logging (hypercorn,
    quart), across starts, ends, cancels, supersedes, 401s and 404s."""
    caplog.set_level(logging.DEBUG)
    text = io.StringIO()
    wrong = "sk-wrong-key-e3b0c44298fc1c14"
    settings = keyed_settings(tmp_path, log_format=log_format)
    with trio.fail_after(20):
        async with logged_server(settings, text) as (_, client, sink):
            a_run = await start_detached(client, KEY_A, "s1")
            await complete(client, KEY_A, "s1")  # supersedes the detached run
            await complete(client, KEY_B, "s2")
            b_run = await start_detached(client, KEY_B, "s3")
            await client.post(f"/v1/runs/{b_run}/cancel", headers=bearer(KEY_B))
            await client.post("/v1/sessions/s3/interrupt", headers=bearer(KEY_B))
            await client.get(f"/v1/runs/{a_run}", headers=bearer(KEY_B))
            await client.get("/v1/models", headers=bearer(wrong))
            await client.post(CHAT, json={"messages": MESSAGES}, headers=bearer(wrong))
            await client.post(CHAT, content=b"{", headers={"authorization": f"Basic {KEY_A}"})
    lines = text.getvalue().splitlines()
    assert {"stream_start", "stream_cancelled", "stream_end"} <= {r["event"] for r in sink.records}
    assert len(lines) == len(sink.records)
    if log_format == "json":
        assert all(isinstance(orjson.loads(line), dict) for line in lines)
    everything = "\n".join([*lines, caplog.text, *(repr(r.__dict__) for r in caplog.records)])
    for key in (KEY_A, KEY_B, wrong):
        assert key not in everything


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.com"])
async def test_open_access_refuses_a_non_loopback_host(host: str, tmp_path: Path) -> None:
    """With no key configured, a non-loopback host is a ConfigError raised by
    open_service before any socket or database is opened; with a key it is valid."""
    db = tmp_path / "never.db"
    settings = Settings(host=host, port=0, db=str(db))
    with pytest.raises(ConfigError, match=f"refusing to serve {host} without an API key"):
        settings.validate()
    with pytest.raises(ConfigError, match="refusing to serve"):
        async with open_service(settings):
            pytest.fail("open_service must not start")
    assert not db.exists()
    settings.replace(api_keys=("k",)).validate()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_open_access_is_allowed_on_loopback(host: str) -> None:
    """Open access (no key) is allowed on every loopback spelling."""
    assert Settings(host=host).validate().api_keys == ()


@pytest.mark.parametrize("via", ["flag", "env"])
async def test_cli_refuses_non_loopback_without_key(via: str, tmp_path: Path) -> None:
    """`trio-stream serve --host 0.0.0.0` (or TRIO_STREAM_HOST) with no key
    exits 2 with a message naming the problem and the fix, never logs
    `listening` and never creates its database."""
    db = tmp_path / "never.db"
    args = [sys.executable, "-m", "trio_stream", "serve", "--port", "0", "--db", str(db)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_STREAM_")}
    if via == "flag":
        args += ["--host", "0.0.0.0"]
    else:
        env["TRIO_STREAM_HOST"] = "0.0.0.0"
    with trio.fail_after(20):
        result = await trio.run_process(
            args, env=env, capture_stdout=True, capture_stderr=True, check=False,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "refusing to serve 0.0.0.0 without an API key" in stderr
    assert "--api-key" in stderr
    assert "listening" not in stderr
    assert not db.exists()


async def test_cli_takes_keys_from_the_environment(tmp_path: Path) -> None:
    """TRIO_STREAM_API_KEYS=k1,k2 makes both keys valid (and nothing else,
    not even the joined string); neither key is written to stderr."""
    k1, k2 = "sk-env-one-8f14e45fceea", "sk-env-two-c9f0f895fb98"
    db = str(tmp_path / "env.db")
    with trio.fail_after(30):
        async with serve_process(
            "--port", "0", "--db", db, "--mock-delay-ms", "0",
            env={"TRIO_STREAM_API_KEYS": f"{k1},{k2}"},
        ) as proc:  # fmt: skip
            url = f"http://127.0.0.1:{proc.port}"
            async with httpx.AsyncClient(base_url=url, timeout=10, verify=False) as client:
                body = {"messages": MESSAGES, "max_tokens": 3}
                statuses = {
                    name: (await client.post(CHAT, json=body, headers=headers)).status_code
                    for name, headers in [
                        ("none", {}),
                        ("k1", bearer(k1)),
                        ("k2", bearer(k2)),
                        ("joined", bearer(f"{k1},{k2}")),
                        ("other", bearer("sk-env-three")),
                    ]
                }
            proc.process.send_signal(signal.SIGTERM)
            assert await proc.wait_exit() == 0
    assert statuses == {"none": 401, "k1": 200, "k2": 200, "joined": 401, "other": 401}
    stderr = "\n".join(proc.lines)
    assert "stream_start" in stderr
    assert k1 not in stderr
    assert k2 not in stderr


def test_auth_compares_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Auth compares the token's SHA-256 with hmac.compare_digest against
    every configured key's, whichever key matches and whether any does (no
    early exit; equal lengths whatever was sent), and only a Bearer token of
    exactly one key is accepted."""
    keys = ("key-one-aaaa", "key-two-bbbb", "key-three-cc")
    auth = Auth(keys)
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    tenants = set()
    for given in [*keys, "key-one-aaab", "x" * len(keys[0]), "key", keys[0] + "x", ""]:
        calls.clear()
        if given in keys:
            tenants.add(auth.tenant(f"Bearer {given}"))
        else:
            with pytest.raises(ApiError, match="Missing or invalid API key"):
                auth.tenant(f"Bearer {given}")
        assert len(calls) == len(keys), given  # every key compared: no early exit
        assert {b for _, b in calls} == {hashlib.sha256(given.encode()).digest()}
    assert len(tenants) == len(keys)  # each key is its own tenant
    assert auth.tenant(f"bearer {keys[1]}") == auth.tenant(f"Bearer {keys[1]}")
    for header in [None, keys[0], f"Basic {keys[0]}", f"Token {keys[0]}"]:
        with pytest.raises(ApiError, match="Missing or invalid API key"):
            auth.tenant(header)
