"""A crash of our own code inside one run never ends the process (issue 18).

A run that raises an exception nobody expected -- a bug, not an upstream
fault (those are tests/test_upstream_faults.py) -- is caught at the top of
its reader (``RunManager.drive``), logged as ``run_crashed`` and ended
``failed`` with reason ``internal_error``.  The client is told that it was
the server's fault: an HTTP 500 ``server_error`` / ``internal_error`` if
nothing was sent yet (and for ``stream: false``), else one ``server_error``
event in place of ``[DONE]``.  Never a 409 ``stream_cancelled`` or an
``upstream_error``, which is what issue 18 saw (docs/api.md sections 2.2,
2.4, 4).  Then, as for any other ending: the partial is saved once as
``failed``, no task is left behind, and the next request is served.

The exception is injected at three places, each on a real in-process server
with the mock upstream: the upstream raising as its stream opens (before the
first token), the upstream raising after three tokens, and our own code in
the reader (the time-to-first-token metric) raising right after the first
token.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from tests.conftest import Server, running_server, tasks_living
from trio_stream import Settings
from trio_stream.protocol import ChatRequest
from trio_stream.service import PUBLIC_TENANT
from trio_stream.sse import SSEDecoder
from trio_stream.upstream import Item
from trio_stream.upstream.mock import MockUpstream

CHAT = "/v1/chat/completions"
MIDWAY = 3  # tokens the "mid-stream" crash lets through


class Injected(Exception):
    """The unexpected exception: no part of trio_stream knows it."""


class CrashingUpstream:
    """The mock upstream, except for a request whose last message is
    ``crash-at-open`` (raises as the stream opens) or ``crash-mid-stream``
    (raises after :data:`MIDWAY` tokens).  Every other request is the mock's."""

    name = "crashing"

    def __init__(self) -> None:
        self.inner = MockUpstream(0.001)

    def stream(self, request: ChatRequest) -> AbstractAsyncContextManager[AsyncIterator[Item]]:
        return self._stream(request)

    @asynccontextmanager
    async def _stream(self, request: ChatRequest) -> AsyncIterator[AsyncIterator[Item]]:
        when = request.messages[-1].get("content")
        if when == "crash-at-open":
            raise Injected("at open")
        crash = when == "crash-mid-stream"
        async with self.inner.stream(request) as items, aclosing(self._items(items, crash)) as ours:
            yield ours

    async def _items(self, items: AsyncIterator[Item], crash: bool) -> AsyncGenerator[Item]:
        sent = 0
        async for item in items:
            if crash and sent == MIDWAY:
                raise Injected("mid-stream")
            yield item
            sent += 1

    async def models(self) -> list[dict[str, Any]]:
        return await self.inner.models()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.inner.run(task_status=task_status)

    async def aclose(self) -> None:
        await self.inner.aclose()


def crash_settings(tmp_path: Path) -> Settings:
    return Settings(port=0, db=str(tmp_path / "crash.db"), mock_delay_ms=1)


def chat_body(prompt: str, stream: bool, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}], "stream": stream, **fields}


def sse_data(raw: bytes) -> list[str]:
    return [e.data for e in SSEDecoder().feed(raw)]


def text_of(data: list[str]) -> str:
    chunks = [orjson.loads(d) for d in data if d.startswith('{"id"')]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def assert_internal_error(error: dict[str, Any]) -> None:
    """The documented internal error: our fault, said so, nothing of the bug shown."""
    assert (error["type"], error["code"]) == ("server_error", "internal_error"), error
    assert "logged" in error["message"]
    assert "Injected" not in error["message"]


async def post(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
    async with client.stream("POST", CHAT, json=body) as response:
        return response, await response.aread()


async def assert_ended_as_a_crash(server: Server, run_id: str, content: str) -> None:
    """Logged once as run_crashed (with the exception) and ended internal_error,
    never as an upstream failure; the partial saved once as failed."""
    crashed = server.logs.events("run_crashed", trace=run_id)
    assert len(crashed) == 1, crashed
    assert "Injected" in crashed[0]["error"]
    ended = [r["reason"] for r in server.logs.events("stream_cancelled", trace=run_id)]
    assert ended == ["internal_error"]
    store = server.service.store
    saved = await store.get(PUBLIC_TENANT, run_id)
    if not content:
        assert saved is None  # a run that produced nothing is not saved (docs/api.md 2.6)
        return
    assert saved is not None
    assert (saved.content, saved.status, saved.reason) == (content, "failed", "internal_error")
    assert await store.count(run_id) == 1
    assert not server.logs.events("save_failed")


async def assert_still_serving(client: httpx.AsyncClient) -> None:
    """A following request is served whole."""
    response, raw = await post(client, chat_body("after the crash", True, max_tokens=5))
    assert response.status_code == 200
    data = sse_data(raw)
    assert data[-1] == "[DONE]"
    assert text_of(data)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("where", ["crash-at-open", "crash-mid-stream", "in-our-reader"])
async def test_a_crash_in_a_run_is_a_500_or_an_error_event_and_the_server_goes_on(
    where: str, stream: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception inside a run, before or after its first token,
    from the upstream or from our own reader, answers the documented internal
    error (500 ``server_error``/``internal_error`` before anything was sent or
    for ``stream: false``; else the deltas so far and one such error event,
    no ``[DONE]``), is logged as ``run_crashed``, saves the partial once as
    ``failed``/``internal_error``, leaves no task behind (exact baseline),
    and the next request on the same server is served whole."""
    with trio.fail_after(15):
        async with (
            running_server(crash_settings(tmp_path), upstream=CrashingUpstream()) as server,
            httpx.AsyncClient(base_url=server.url, timeout=10, verify=False) as client,
        ):
            assert (await client.get("/healthz")).status_code == 200  # warm one connection
            baseline = await tasks_living()
            if where == "in-our-reader":
                ttft = server.service.metrics.ttft

                def observe(value: float) -> None:
                    raise Injected("in the reader, after the first token")

                monkeypatch.setattr(ttft, "observe", observe)
            response, raw = await post(client, chat_body(where, stream))
            run_id = response.headers["x-run-id"]
            tokens = {"crash-at-open": 0, "crash-mid-stream": MIDWAY, "in-our-reader": 1}[where]

            if stream and tokens:
                assert response.status_code == 200, raw
                data = sse_data(raw)
                assert "[DONE]" not in data
                assert_internal_error(orjson.loads(data[-1])["error"])
                content = text_of(data)
            else:
                assert response.status_code == 500, raw
                assert response.headers["content-type"].startswith("application/json")
                assert list(orjson.loads(raw)) == ["error"]
                assert_internal_error(orjson.loads(raw)["error"])
                content = ""
            # The answer is written after the run's cleanup: its row is in.
            saved = await server.service.store.get(PUBLIC_TENANT, run_id)
            if tokens and not stream:
                assert saved is not None
                content = saved.content
            assert (len(content) > 0) == (tokens > 0)
            await assert_ended_as_a_crash(server, run_id, content)
            assert await tasks_living() == baseline

            monkeypatch.undo()
            await assert_still_serving(client)
            assert await tasks_living() == baseline


async def test_a_detached_run_that_crashes_is_failed_internal_error_for_every_reader(
    tmp_path: Path,
) -> None:
    """A detached run that crashes mid-stream: its own ``stream: false``
    answer is the 500 internal error, the run object says ``failed`` /
    ``internal_error``, a replay of its events ends with the
    ``server_error`` event, and no task is left once it is over."""
    with trio.fail_after(15):
        async with (
            running_server(crash_settings(tmp_path), upstream=CrashingUpstream()) as server,
            httpx.AsyncClient(base_url=server.url, timeout=10, verify=False) as client,
        ):
            assert (await client.get("/healthz")).status_code == 200
            baseline = await tasks_living()
            response, raw = await post(client, chat_body("crash-mid-stream", False, detach=True))
            assert response.status_code == 500, raw
            assert_internal_error(orjson.loads(raw)["error"])
            run_id = response.headers["x-run-id"]
            run = (await client.get(f"/v1/runs/{run_id}")).json()
            assert (run["status"], run["reason"], run["events"]) == (
                "failed", "internal_error", MIDWAY,
            )  # fmt: skip
            replay = await client.get(f"/v1/runs/{run_id}/events")
            data = sse_data(replay.content)
            assert text_of(data) == run["content"] != ""
            assert_internal_error(orjson.loads(data[-1])["error"])
            await assert_ended_as_a_crash(server, run_id, run["content"])
            assert await tasks_living() == baseline
            await assert_still_serving(client)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("where", ["crash-at-open", "crash-mid-stream"])
async def test_a_response_that_crashes_is_failed(where: str, stream: bool, tmp_path: Path) -> None:
    """The Responses API reports a crashed run as it reports any failure
    (docs/api.md section 8.2): status ``failed`` with a ``server_error``, as
    the object (``stream: false``) or the final ``response.failed`` event;
    the run is logged ``run_crashed`` / ``internal_error``, no task is left,
    and the server goes on."""
    with trio.fail_after(15):
        async with (
            running_server(crash_settings(tmp_path), upstream=CrashingUpstream()) as server,
            httpx.AsyncClient(base_url=server.url, timeout=10, verify=False) as client,
        ):
            assert (await client.get("/healthz")).status_code == 200
            baseline = await tasks_living()
            async with client.stream(
                "POST", "/v1/responses", json={"input": where, "stream": stream}
            ) as response:
                raw = await response.aread()
            assert response.status_code == 200, raw
            if stream:
                final = orjson.loads(sse_data(raw)[-1])
                assert final["type"] == "response.failed"
                obj = final["response"]
            else:
                obj = orjson.loads(raw)
            assert obj["status"] == "failed"
            assert obj["error"]["code"] == "server_error"
            assert "logged" in obj["error"]["message"]
            content = "".join(p["text"] for item in obj["output"] for p in item["content"])
            await assert_ended_as_a_crash(server, obj["id"], content)
            assert await tasks_living() == baseline
            await assert_still_serving(client)


@pytest.mark.parametrize("detach", [True, False], ids=["detached", "attached"])
@pytest.mark.parametrize("where", ["save", "release"])
async def test_a_crash_in_a_runs_cleanup_ends_the_run_not_the_process(
    where: str, detach: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a run's cleanup -- its save, or the release of its session in
    the shared state -- is logged ``run_crashed`` and the run still ends: its
    client gets its answer, it is counted out, no task is left, and the next
    request of the same session is served.  Before, the exception left the
    cleanup: an attached run's request died with a bare 500, and a detached
    run's crash reached the run manager's nursery and ended the process."""
    with trio.fail_after(15):
        async with (
            running_server(crash_settings(tmp_path), upstream=CrashingUpstream()) as server,
            httpx.AsyncClient(
                base_url=server.url, timeout=10, verify=False, headers={"x-session-id": "s1"}
            ) as client,
        ):
            assert (await client.get("/healthz")).status_code == 200
            baseline = await tasks_living()
            runs = server.service.runs

            async def broken(*args: Any) -> Any:
                raise Injected(f"in the {where}")

            if where == "save":
                monkeypatch.setattr(runs, "_save", broken)
            else:
                monkeypatch.setattr(runs.shared, "release", broken)
            response, raw = await post(client, chat_body("hi", False, detach=detach, max_tokens=4))
            assert response.status_code == 200, raw
            assert orjson.loads(raw)["choices"][0]["finish_reason"] == "length"
            run_id = response.headers["x-run-id"]
            crashed = server.logs.events("run_crashed", trace=run_id)
            assert len(crashed) == 1, crashed
            assert "Injected" in crashed[0]["error"]
            if detach:
                run = (await client.get(f"/v1/runs/{run_id}")).json()
                assert (run["status"], run["reason"]) == ("completed", "length")
            assert runs.live == 0
            assert await tasks_living() == baseline

            monkeypatch.undo()
            await assert_still_serving(client)
            assert runs.live == 0
            assert await tasks_living() == baseline
