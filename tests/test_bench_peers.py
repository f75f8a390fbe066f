"""The benchmark's peer servers (tools/peers/) serve exactly trio-stream's mock stream.

Each peer runs as its own process, as ``tools/bench.py`` runs it, on a free
127.0.0.1 port, and every process is killed (with its process group) however
the test ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import orjson
import pytest
import trio

from trio_stream.upstream import mocktext
from trio_stream.wire.chunks import ChunkEncoder
from trio_stream.wire.sse import SSEDecoder

ROOT = Path(__file__).resolve().parents[1]
PEERS_DIR = ROOT / "tools" / "peers"
PEERS = ["uvicorn_sse_starlette", "hypercorn_quart_trio", "bare_trio"]
MESSAGES = [{"role": "user", "content": "bench me"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_listening(port: int, process: trio.Process) -> None:
    """Poll until the peer accepts connections (real time: a subprocess starting)."""
    while True:
        assert process.returncode is None, f"peer exited with {process.returncode}"
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.05)
            continue
        await stream.aclose()
        return


@asynccontextmanager
async def running_script(script: Path, args: list[str], log: Path) -> AsyncIterator[str]:
    """Start ``script --port <free> *args``; yield its base URL; kill its process group."""
    port = free_port()
    with log.open("wb") as err:
        process = await trio.lowlevel.open_process(
            [sys.executable, str(script), "--port", str(port), *args],
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )  # fmt: skip
    try:
        with trio.fail_after(15):
            await wait_listening(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await process.wait()


def running_peer(name: str, delay_ms: float, log: Path) -> AbstractAsyncContextManager[str]:
    """Start ``tools/peers/<name>.py``; yield its base URL; kill its process group."""
    return running_script(PEERS_DIR / f"{name}.py", ["--delay-ms", str(delay_ms)], log)


async def stream_raw(url: str, max_tokens: int) -> tuple[bytes, float]:
    """POST a streaming chat completion; its raw body and how long it took."""
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            body = {"model": "mock", "messages": MESSAGES, "stream": True,
                    "max_tokens": max_tokens}  # fmt: skip
            started = trio.current_time()
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                raw = b"".join([chunk async for chunk in r.aiter_raw()])
            return raw, trio.current_time() - started


def assert_mock_bytes(raw: bytes, max_tokens: int) -> None:
    """``raw`` is byte for byte trio-stream's uncoalesced encoding of the mock reply."""
    events = SSEDecoder().feed(raw)
    first = orjson.loads(events[0].data)
    tokens = list(mocktext.tokens(MESSAGES, max_tokens))
    encoder = ChunkEncoder(first["id"], "mock", first["created"], coalesce=False)
    assert raw == encoder.render(tokens, 1) + encoder.finish("length")
    text = "".join(
        orjson.loads(e.data)["choices"][0]["delta"].get("content", "") for e in events[:-1]
    )
    assert text == mocktext.expected_text(MESSAGES, max_tokens)


@pytest.mark.parametrize("name", PEERS)
async def test_peer_streams_trio_streams_exact_bytes(name: str, tmp_path: Path) -> None:
    """A peer's reply is byte for byte what trio-stream's encoder sends with coalescing
    off (one event per token, ids from 1, role in the first delta, finish chunk,
    [DONE]), and its text is ``mocktext.expected_text``: the bench compares like
    with like.  The ``--delay-ms`` gap is honoured (a lower bound on the time)."""
    max_tokens, delay_ms = 12, 5.0
    async with running_peer(name, delay_ms, tmp_path / "peer.log") as url:
        raw, elapsed = await stream_raw(url, max_tokens)
    assert_mock_bytes(raw, max_tokens)
    assert elapsed >= max_tokens * delay_ms / 1000


async def test_relay_peer_relays_the_fake_openai_upstream_exactly(tmp_path: Path) -> None:
    """tools/fake_openai.py streams the same bytes as the peers, at its --delay-ms
    pace, and the relay peer (uvicorn + httpx) passes them on unchanged."""
    max_tokens, delay_ms = 12, 5.0
    fake = ROOT / "tools" / "fake_openai.py"
    async with running_script(fake, ["--delay-ms", str(delay_ms)], tmp_path / "up.log") as up:
        raw, elapsed = await stream_raw(up, max_tokens)
        assert_mock_bytes(raw, max_tokens)
        assert elapsed >= max_tokens * delay_ms / 1000
        relay = PEERS_DIR / "uvicorn_httpx_relay.py"
        args = ["--upstream-url", f"{up}/v1"]
        async with running_script(relay, args, tmp_path / "relay.log") as url:
            raw, elapsed = await stream_raw(url, max_tokens)
    assert_mock_bytes(raw, max_tokens)
    assert elapsed >= max_tokens * delay_ms / 1000
