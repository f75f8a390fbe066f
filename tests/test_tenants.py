"""Tenant isolation: the runs and messages of one API key are invisible to
every other key (404, as if they did not exist), and no key at all is 401.

In-memory driver with ``autojump_clock``: this is about routing and state, not
about connections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import RecordingStore, memory_app, until_seq
from tests.memasgi import MemoryClient, start_request
from trio_stream import Settings
from trio_stream.upstream import mocktext

MESSAGES = [{"role": "user", "content": "mine, not yours"}]
K1 = {"authorization": "Bearer k1"}
K2 = {"authorization": "Bearer k2"}
SESSION = "shared-name"


def keyed(settings: Settings, tmp_path: Path) -> Settings:
    return settings.replace(api_keys=("k1", "k2"), db=str(tmp_path / "mem.db"), mock_delay_ms=20)


def chat(*, detach: bool = True) -> dict[str, Any]:
    return {"messages": MESSAGES, "stream": True, "max_tokens": 30, "detach": detach}


def foreign_requests(run_id: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"/v1/runs/{run_id}"),
        ("GET", f"/v1/runs/{run_id}/events"),
        ("POST", f"/v1/runs/{run_id}/cancel"),
        ("GET", f"/v1/sessions/{SESSION}/messages"),
        ("POST", f"/v1/sessions/{SESSION}/interrupt"),
    ]


async def ask_all(
    app: Any, requests: list[tuple[str, str]], headers: dict[str, str]
) -> list[MemoryClient]:
    async with trio.open_nursery() as nursery:
        clients = [start_request(nursery, app, m, p, headers=headers) for m, p in requests]
    return clients


def assert_openai_error(client: MemoryClient, status: int, type_: str) -> None:
    assert client.status == status, (client.status, bytes(client.body))
    error = client.json()["error"]
    assert error["type"] == type_
    assert isinstance(error["message"], str)
    assert "code" in error


@pytest.mark.parametrize("phase", ["running", "saved"])
async def test_another_key_sees_404_for_everything_of_k1(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock, phase: str
) -> None:
    """With k2, k1's run (live in memory, or finished and only in the store)
    and k1's session answer 404 not_found_error on GET, /events, /cancel,
    /messages and /interrupt -- and k2's cancel does not touch k1's run."""
    store = RecordingStore(str(tmp_path / "mem.db"), threaded=False)
    with trio.fail_after(30):
        async with memory_app(keyed(settings, tmp_path), store=store) as (service, app):
            async with trio.open_nursery() as nursery:
                owner = start_request(
                    nursery, app, "POST", "/v1/chat/completions",
                    json=chat(detach=phase == "running"),
                    headers={**K1, "x-session-id": SESSION},
                )  # fmt: skip
                if phase == "running":
                    await owner.wait_until(lambda c: c.status is not None)
                    run = service.runs.runs[owner.headers["x-run-id"]]
                    await until_seq(run, 3)
                else:
                    await owner.finished.wait()
                run_id = owner.headers["x-run-id"]
                foreign = await ask_all(app, foreign_requests(run_id), K2)
                own = await ask_all(app, foreign_requests(run_id)[:1], K1)
                await owner.finished.wait()
            for client in foreign:
                assert_openai_error(client, 404, "not_found_error")
            assert own[0].status == 200
            assert own[0].json()["id"] == run_id
            assert owner.text() == mocktext.expected_text(MESSAGES, 30)  # k2 stopped nothing
            assert [m.status for m in store.saves_of(run_id)] == ["complete"]


async def test_without_a_key_everything_is_401(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """No key, or an unknown key, is 401 authentication_error on every /v1 route."""
    with trio.fail_after(30):
        async with memory_app(keyed(settings, tmp_path)) as (_, app):
            requests = [("POST", "/v1/chat/completions"), *foreign_requests("run_x")]
            for headers in ({}, {"authorization": "Bearer k3"}, {"authorization": "k1"}):
                for client in await ask_all(app, requests, headers):
                    assert_openai_error(client, 401, "authentication_error")


async def test_same_session_name_under_two_keys_are_two_sessions(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """k2 using k1's session id neither supersedes k1's run nor sees its
    messages: each key has its own session of that name."""
    store = RecordingStore(str(tmp_path / "mem.db"), threaded=False)
    with trio.fail_after(30):
        async with memory_app(keyed(settings, tmp_path), store=store) as (service, app):
            async with trio.open_nursery() as nursery:
                path = "/v1/chat/completions"
                first = start_request(nursery, app, "POST", path, json=chat(),
                                      headers={**K1, "x-session-id": SESSION})  # fmt: skip
                await first.wait_until(lambda c: c.status is not None)
                run1 = service.runs.runs[first.headers["x-run-id"]]
                await until_seq(run1, 3)
                second = start_request(nursery, app, "POST", path, json=chat(detach=False),
                                       headers={**K2, "x-session-id": SESSION})  # fmt: skip
                await second.finished.wait()
                await first.finished.wait()
                lists = {
                    name: start_request(
                        nursery, app, "GET", f"/v1/sessions/{SESSION}/messages", headers=key
                    )
                    for name, key in (("k1", K1), ("k2", K2))
                }
                for client in lists.values():
                    await client.finished.wait()
            assert run1.log.status.value == "completed"  # not superseded by k2
            assert [m["run_id"] for m in lists["k1"].json()["data"]] == [run1.id]
            assert [m["run_id"] for m in lists["k2"].json()["data"]] == [second.headers["x-run-id"]]
