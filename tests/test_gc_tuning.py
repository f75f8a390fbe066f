"""The serving process's garbage collector (docs/design.md section 15)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import trio
from click.testing import CliRunner

from trio_stream import cli
from trio_stream.server import signals


def test_tune_gc_freezes_start_up_objects_and_raises_the_thresholds() -> None:
    """After ``tune_gc`` the objects that exist (modules, the app) are out of
    the collector's reach and the young generation is ``GC_THRESHOLDS``:
    checked in a fresh process, as ``trio-stream serve`` runs it."""
    code = (
        "import gc; from trio_stream.server.signals import tune_gc; tune_gc(); "
        "print(gc.get_threshold(), gc.get_freeze_count() > 1000)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split(")")
    assert out[0] + ")" == str(signals.GC_THRESHOLDS)
    assert out[1].strip() == "True"


def test_serve_tunes_the_collector_before_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """``trio-stream serve`` tunes the collector once, before ``trio.run``
    (so the service is never served with CPython's default thresholds)."""
    calls: list[str] = []
    monkeypatch.setattr(signals, "tune_gc", lambda: calls.append("tune_gc"))

    def fake_run(*_args: Any) -> None:
        calls.append("trio.run")

    monkeypatch.setattr(trio, "run", fake_run)
    result = CliRunner().invoke(cli.main, ["serve", "--db", ":memory:"])
    assert result.exit_code == 0, result.output
    assert calls == ["tune_gc", "trio.run"]
