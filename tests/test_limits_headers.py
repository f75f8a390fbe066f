"""Every answer of a key with a rate carries its ``x-ratelimit-*`` headers
(docs/api.md section 2.11): on every route a key can reach -- streams, their
followers, the Responses API, the JSON routes -- and whatever the status,
also for a request refused before its key's admission (a bad body, a model
the key may not use, the server's own stream limit, shutting down, an
unknown route).  On the real server, on real sockets, with the limits in a
real Redis (cluster mode, one node)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.conftest import loopback_client, running_server
from tests.redis_server import RedisServer
from trio_stream import Settings
from trio_stream.limits.keys import parse_keys

ALICE = {"authorization": "Bearer sk-alice"}
BOB = {"authorization": "Bearer sk-bob"}
MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
RATE = (
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
)  # fmt: skip


def keys() -> Any:
    return parse_keys(
        [
            {"name": "alice", "secret": "sk-alice", "rpm": 1000, "tpm": 1_000_000,
             "models": ["mock"]},
            {"name": "bob", "secret": "sk-bob"},
        ]
    )  # fmt: skip


def chat(**body: Any) -> dict[str, Any]:
    return {"model": "mock", "messages": MESSAGES, "max_tokens": 2, **body}


def rated(answer: httpx.Response, status: int) -> httpx.Response:
    """``answer`` has ``status`` and all six headers, with alice's limits."""
    where = f"{answer.request.method} {answer.request.url.path} -> {answer.status_code}"
    assert answer.status_code == status, (where, answer.text)
    missing = [h for h in RATE if h not in answer.headers]
    assert not missing, (where, missing)
    assert answer.headers["x-ratelimit-limit-requests"] == "1000", where
    assert answer.headers["x-ratelimit-limit-tokens"] == "1000000", where
    return answer


async def test_every_route_and_status_of_a_limited_key_has_the_headers(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    """Each route a key can reach, with a 2xx and with the errors it can
    answer before or after admission, carries the key's six
    ``x-ratelimit-*`` headers; a key without limits and a request without
    a valid key get none."""
    settings = Settings(
        port=0, db=str(tmp_path / "h.db"), redis=own_redis.url, mock_delay_ms=5, max_streams=3
    )
    async with (
        running_server(settings, keys=keys()) as server,
        loopback_client(server) as c,
    ):
        # Chat completions: admitted, a bad body, a model the key may not use,
        # a method the route does not have.
        rated(await c.post(CHAT, json=chat(), headers=ALICE), 200)
        rated(await c.post(CHAT, content=b"{", headers=ALICE), 400)
        rated(await c.post(CHAT, json=chat(model="gpt-x"), headers=ALICE), 404)
        rated(await c.delete(CHAT, headers=ALICE), 405)
        # A detached run and its follower, its JSON, its cancel; an unknown run.
        detached = rated(
            await c.post(CHAT, json=chat(detach=True, stream=True, max_tokens=3), headers=ALICE),
            200,
        )
        run_id = detached.headers["x-run-id"]
        rated(await c.get(f"/v1/runs/{run_id}/events", headers=ALICE), 200)
        rated(await c.get(f"/v1/runs/{run_id}/events?after=x", headers=ALICE), 400)
        rated(await c.get(f"/v1/runs/{run_id}", headers=ALICE), 200)
        rated(await c.post(f"/v1/runs/{run_id}/cancel", headers=ALICE), 200)
        rated(await c.get("/v1/runs/run_nope/events", headers=ALICE), 404)
        rated(await c.get("/v1/runs/run_nope", headers=ALICE), 404)
        # The Responses API: create, retrieve (object and stream), cancel, unknown.
        rated(await c.post("/v1/responses", json={"model": "mock", "input": "hi"}, headers=ALICE),
              200)  # fmt: skip
        background = {"model": "mock", "input": "hi", "background": True}
        created = rated(await c.post("/v1/responses", json=background, headers=ALICE), 200)
        resp_id = created.json()["id"]
        rated(await c.get(f"/v1/responses/{resp_id}", headers=ALICE), 200)
        rated(await c.get(f"/v1/responses/{resp_id}?stream=true", headers=ALICE), 200)
        rated(await c.get(f"/v1/responses/{resp_id}?stream=maybe", headers=ALICE), 400)
        rated(await c.post(f"/v1/responses/{resp_id}/cancel", headers=ALICE), 200)
        rated(await c.get("/v1/responses/resp_nope", headers=ALICE), 404)
        rated(await c.post("/v1/responses", content=b"[]", headers=ALICE), 400)
        # Sessions and the JSON routes.
        session = {**ALICE, "x-session-id": "s1"}
        rated(await c.post(CHAT, json=chat(), headers=session), 200)
        rated(await c.get("/v1/sessions/s1/messages", headers=ALICE), 200)
        rated(await c.post("/v1/sessions/s1/interrupt", headers=ALICE), 200)
        rated(await c.get("/v1/sessions/nope/messages", headers=ALICE), 404)
        rated(await c.get("/v1/models", headers=ALICE), 200)
        rated(await c.get("/v1/usage", headers=ALICE), 200)
        rated(await c.get("/v1/nothing-here", headers=ALICE), 404)
        # 409: a whole answer whose run is interrupted by its session's owner.
        async with trio.open_nursery() as nursery:
            answers: list[httpx.Response] = []

            async def whole() -> None:
                body = chat(max_tokens=400)
                answers.append(
                    await c.post(CHAT, json=body, headers={**ALICE, "x-session-id": "s2"})
                )

            nursery.start_soon(whole)
            with trio.fail_after(10):  # 404 until the run is known, then interrupted
                while (  # noqa: ASYNC110 - the run starts on the server's side
                    await c.post("/v1/sessions/s2/interrupt", headers=ALICE)
                ).json().get("interrupted") is not True:
                    await trio.sleep(0.01)
        rated(answers[0], 409)
        # The server's own stream limit (--max-streams 3), for a new stream and a follower.
        long = chat(stream=True, max_tokens=2000)
        async with (
            c.stream("POST", CHAT, json=long, headers=ALICE) as s1,
            c.stream("POST", CHAT, json=long, headers=ALICE) as s2,
            c.stream("POST", CHAT, json=long, headers=BOB) as s3,
        ):
            assert (s1.status_code, s2.status_code, s3.status_code) == (200, 200, 200)
            rated(s1, 200)
            full = rated(await c.post(CHAT, json=chat(), headers=ALICE), 429)
            assert full.json()["error"]["code"] == "too_many_streams"
            rated(await c.get(f"/v1/runs/{run_id}/events", headers=ALICE), 429)
            assert "x-ratelimit-limit-requests" not in s3.headers  # bob has no limits
        with trio.fail_after(5):  # the three streams' slots free as their requests end
            while server.service.streams:  # noqa: ASYNC110 - released on the server's side
                await trio.sleep(0.01)
        # Shutting down: 503 before admission.
        server.service.shutting_down = True
        try:
            rated(await c.post(CHAT, json=chat(), headers=ALICE), 503)
        finally:
            server.service.shutting_down = False
        # No key, a wrong key, a key without limits: no headers.
        for headers in ({}, {"authorization": "Bearer sk-wrong"}, BOB):
            answer = await c.post(CHAT, json=chat(), headers=headers)
            assert answer.status_code == (200 if headers is BOB else 401)
            assert not [h for h in answer.headers if h.startswith("x-ratelimit-")]


async def test_a_hung_store_never_delays_an_answer_twice(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    """Redis stopped without closing its connections (SIGSTOP: it neither
    answers nor refuses): ``closed`` answers 503 ``limits_unavailable``
    within 2.5 s -- the admission's one call deadline, and no second wait
    for the answer's headers -- and a follower's answer right after it is
    not held by the store either."""
    settings = Settings(port=0, db=str(tmp_path / "h.db"), limits_redis=own_redis.url,
                        mock_delay_ms=1)  # fmt: skip
    async with (
        running_server(settings, keys=keys()) as server,
        loopback_client(server) as c,
    ):
        detached = rated(
            await c.post(CHAT, json=chat(detach=True, stream=True), headers=ALICE), 200
        )
        own_redis.process.send_signal(19)  # SIGSTOP, by its own pid
        try:
            start = time.monotonic()
            with trio.fail_after(2.5):
                refused = await c.post(CHAT, json=chat(), headers=ALICE)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "limits_unavailable"
            with trio.fail_after(0.5):
                follower = await c.get(
                    f"/v1/runs/{detached.headers['x-run-id']}/events", headers=ALICE
                )
            assert follower.status_code == 200
            assert time.monotonic() - start < 2.5
        finally:
            own_redis.process.send_signal(18)  # SIGCONT
