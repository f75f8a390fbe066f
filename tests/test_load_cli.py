"""``trio-stream load`` against a real in-process server, every scenario, both protocols.

Each test runs :func:`trio_stream.load.run_load` in-process against
``running_server`` (real hypercorn on 127.0.0.1, the mock upstream at 1 ms a
token) and checks the report against the server's own view: the counts the
scenario must produce, zero lost / duplicated / reordered tokens, the
server's ``tasks_living`` back to where it was, and no run or stream left.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from click.testing import CliRunner

from tests.conftest import Server, running_server, tasks_living
from tools.fakes import FakeUpstream
from trio_stream import Settings
from trio_stream.load import LoadConfig, run_load
from trio_stream.load.cli import load

PROTOCOLS = pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2c"])


def config_for(server: Server, scenario: str, **kw: Any) -> LoadConfig:
    base: dict[str, Any] = {
        "requests": 12, "concurrency": 4, "max_tokens": 48, "seed": 11, "timeout": 10.0,
    }  # fmt: skip
    return LoadConfig(url=server.url, scenario=scenario, **{**base, **kw})


async def load_and_settle(server: Server, config: LoadConfig) -> dict[str, Any]:
    """Run the load, then check nothing of it is left on the server."""
    baseline = await tasks_living()
    report = await run_load(config)
    await server.service.runs.wait_idle()
    await server.service.wait_streams_closed()
    assert await tasks_living() == baseline
    assert server.service.runs.live == 0
    before, after = report["server"]["tasks_living_before"], report["server"]["tasks_living_after"]
    assert before is not None
    assert after == before
    return report


def assert_clean(report: dict[str, Any], *, checked: int | None = None) -> None:
    """Every answered request's text is the mock's reply or a prefix of it."""
    i = report["integrity"]
    assert (i["lost"], i["duplicated"], i["reordered"]) == (0, 0, 0)
    assert (i["foreign"], i["mismatched"]) == (0, 0)
    total = report["requests"]["total"]
    assert i["checked_requests"] == (total if checked is None else checked)


def counts(report: dict[str, Any]) -> tuple[int, int, int, int]:
    r = report["requests"]
    return r["total"], r["ok"], r["cancelled"], r["failed"]


@PROTOCOLS
async def test_steady_streams_every_token(settings: Settings, http2: bool) -> None:
    """Steady streams all complete with the exact text; tokens and events are
    counted, first-token times measured, and the client's CPU reported."""
    with trio.fail_after(20):
        async with running_server(settings) as server:
            report = await load_and_settle(server, config_for(server, "steady", http2=http2))
    assert counts(report) == (12, 12, 0, 0)
    assert report["tokens"] == 12 * 48
    assert report["events"] >= 12 * 2  # at least one content event and the finish chunk
    assert 0 < report["ttft_ms"]["p50"] <= report["ttft_ms"]["max"]
    assert report["client"]["cpu_s"] > 0
    assert report["http2"] is http2
    assert_clean(report)


@PROTOCOLS
async def test_disconnect_cancels_runs_without_damage(settings: Settings, http2: bool) -> None:
    """Disconnects at seeded points (TCP close / RST_STREAM) are counted as
    cancelled, never failed; what each client got is a prefix of its reply;
    siblings on a shared HTTP/2 connection are not disturbed."""
    with trio.fail_after(20):
        async with running_server(settings) as server:
            config = config_for(server, "disconnect", http2=http2, requests=20)
            report = await load_and_settle(server, config)
            server_cancelled = server.logs.events("stream_cancelled", reason="client_disconnect")
    total, ok, cancelled, failed = counts(report)
    assert (total, failed) == (20, 0)
    assert cancelled == report["cancelled_by"]["client_disconnect"] >= 10
    assert ok + cancelled == 20
    assert len(server_cancelled) <= cancelled
    assert_clean(report, checked=report["integrity"]["checked_requests"])
    assert report["integrity"]["checked_requests"] >= ok


@PROTOCOLS
async def test_supersede_cancels_all_but_the_last(settings: Settings, http2: bool) -> None:
    """Requests sent one after another in one session: each earlier one ends
    with the superseded error event (cancelled, not failed), the last one
    completes, and the server logs each predecessor finishing cleanly."""
    with trio.fail_after(20):
        async with running_server(settings) as server:
            config = config_for(server, "supersede", http2=http2, max_tokens=300)
            report = await load_and_settle(server, config)
            clean = server.logs.events("prev_stream_finished_cleanly")
    assert counts(report) == (12, 4, 8, 0)  # 4 sessions of 3
    assert report["cancelled_by"] == {"superseded": 8}
    assert len(clean) == 8
    assert_clean(report)


@PROTOCOLS
async def test_stop_cancels_through_the_cancel_endpoint(settings: Settings, http2: bool) -> None:
    """POST /v1/runs/{id}/cancel mid-stream (attached and detached runs) ends
    each stream with the stopped error event; the server agrees."""
    with trio.fail_after(20):
        async with running_server(settings) as server:
            report = await load_and_settle(server, config_for(server, "stop", http2=http2))
            stopped = server.logs.events("stream_cancelled", reason="stopped")
    assert counts(report) == (12, 0, 12, 0)
    assert report["cancelled_by"] == {"stopped": 12}
    assert report["errors"] == {}
    assert len(stopped) == 12
    assert_clean(report)


@PROTOCOLS
async def test_resume_reassembles_the_whole_reply(settings: Settings, http2: bool) -> None:
    """Detached runs dropped mid-stream and resumed with Last-Event-ID yield
    exactly the reply: nothing lost or repeated across the reconnect."""
    with trio.fail_after(20):
        async with running_server(settings) as server:
            report = await load_and_settle(server, config_for(server, "resume", http2=http2))
            completed = server.logs.events("stream_end", status="completed")
    assert counts(report) == (12, 12, 0, 0)
    assert report["resumed"] >= 6
    assert len(completed) == 12
    assert_clean(report)


@PROTOCOLS
async def test_slow_readers_get_everything(settings: Settings, http2: bool) -> None:
    """Readers that pause between small reads still get the exact text."""
    with trio.fail_after(20):
        async with running_server(settings) as server:
            report = await load_and_settle(server, config_for(server, "slow-reader", http2=http2))
    assert counts(report) == (12, 12, 0, 0)
    assert_clean(report)


@PROTOCOLS
async def test_mixed_load_is_clean(settings: Settings, http2: bool) -> None:
    """A seeded mix of every scenario: nothing fails, nothing is damaged."""
    with trio.fail_after(20):
        async with running_server(settings) as server:
            config = config_for(server, "mixed", http2=http2, requests=40, concurrency=8)
            report = await load_and_settle(server, config)
    total, ok, cancelled, failed = counts(report)
    assert (total, failed) == (40, 0)
    assert ok + cancelled == 40
    assert set(report["cancelled_by"]) <= {"client_disconnect", "stopped", "superseded"}
    assert_clean(report, checked=report["integrity"]["checked_requests"])


@PROTOCOLS
async def test_timeout_bounds_a_unit_and_the_server_cancels(
    settings: Settings, http2: bool
) -> None:
    """A request that outlives --timeout is abandoned (failed: timeout) and
    the server sees the disconnect and cancels its run; a duration-bounded
    run stops starting requests at its deadline."""
    with trio.fail_after(20):
        async with running_server(settings) as server:
            config = config_for(
                server, "steady", http2=http2, requests=None, duration=0.2, max_tokens=100_000,
                timeout=0.4, concurrency=3,
            )  # fmt: skip
            report = await load_and_settle(server, config)
            disconnects = server.logs.events("stream_cancelled", reason="client_disconnect")
    total, _, _, failed = counts(report)
    assert total == failed == 3
    assert report["errors"] == {"timeout": 3}
    assert len(disconnects) == 3
    assert report["wall_s"] < 2
    assert_clean(report)


async def test_a_peer_without_metrics_reports_null(fake_openai: FakeUpstream) -> None:
    """Against a plain OpenAI-compatible server (no /metrics, no event ids)
    the load still checks every token, and the server figures are null."""
    with trio.fail_after(20):
        url = f"http://127.0.0.1:{fake_openai.port}"
        report = await run_load(LoadConfig(url=url, requests=6, concurrency=2, max_tokens=20))
    assert counts(report) == (6, 6, 0, 0)
    assert set(report["server"].values()) == {None}
    assert_clean(report)


async def test_cli_writes_the_json_report(settings: Settings, tmp_path: Path) -> None:
    """`python -m trio_stream load ... --json PATH` exits 0, prints the table
    on stdout, shows no live display when stderr is not a terminal, and
    writes the same report as JSON."""
    out = tmp_path / "report.json"
    with trio.fail_after(30):
        async with running_server(settings) as server:
            argv = [
                sys.executable, "-m", "trio_stream", "load", "--url", server.url,
                "--requests", "8", "--concurrency", "2", "--max-tokens", "16", "--seed", "5",
                "--scenario", "mixed", "--http2", "--json", str(out),
            ]  # fmt: skip
            done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    assert b"trio-stream load: mixed, HTTP/2" in done.stdout
    report = orjson.loads(out.read_bytes())
    assert (report["scenario"], report["http2"], report["requests"]["total"]) == ("mixed", True, 8)
    assert report["requests"]["failed"] == 0
    assert report["integrity"]["lost"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "ftp://127.0.0.1:1"], "--url must be"),
        (["--scenario", "nope"], "Invalid value for '--scenario'"),
        (["--concurrency", "0"], "Invalid value for '--concurrency'"),
    ],
    ids=["url", "scenario", "concurrency"],
)
def test_cli_refuses_bad_options(args: list[str], message: str) -> None:
    """Bad options are a usage error (exit 2) naming the option, before any load."""
    result = CliRunner().invoke(load, args)
    assert result.exit_code == 2
    assert message in result.output
