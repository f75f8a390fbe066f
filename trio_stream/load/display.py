"""Rich rendering for ``trio-stream load``: the live progress line and the final table.

No trio here: :class:`Progress` is called with the tally by the runner's
progress task and re-renders a :class:`rich.live.Live` it does not own.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .accounting import Tally


class Progress:
    """``on_progress`` for :func:`~trio_stream.load.runner.run_load`: a live status."""

    def __init__(self, live: Live, target: int | None, duration: float | None) -> None:
        self.live = live
        self.target = target
        self.duration = duration
        self._last = (0.0, 0)  # (elapsed, tokens) at the previous update

    def __call__(self, tally: Tally, elapsed: float) -> None:
        last_t, last_tokens = self._last
        rate = (tally.tokens - last_tokens) / (elapsed - last_t) if elapsed > last_t else 0.0
        self._last = (elapsed, tally.tokens)
        self.live.update(self.render(tally, elapsed, rate), refresh=True)

    def render(self, tally: Tally, elapsed: float, rate: float) -> RenderableType:
        done = f"{tally.total}" + (f"/{self.target}" if self.target else "")
        clock = f"{elapsed:6.1f}s" + (f"/{self.duration:g}s" if self.duration else "")
        line = Text.assemble(
            (f"{clock}  ", "bold"),
            f"requests {done}  in flight {tally.in_flight}  ",
            ("ok ", "green"), f"{tally.ok}  ",
            ("cancelled ", "yellow"), f"{tally.cancelled}  ",
            ("failed ", "red"), f"{tally.failed}  ",
            f"tokens {tally.tokens:,}  ({rate:,.0f}/s)",
        )  # fmt: skip
        if not tally.errors:
            return line
        top = ", ".join(f"{k} {v}" for k, v in tally.errors.most_common(3))
        return Group(line, Text(f"errors: {top}", style="red"))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def report_table(report: dict[str, Any]) -> Table:
    """The final report as one two-column table."""
    proto = "HTTP/2" if report["http2"] else "HTTP/1.1"
    title = f"trio-stream load: {report['scenario']}, {proto}, concurrency {report['concurrency']}"
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    r, i, s, c = report["requests"], report["integrity"], report["server"], report["client"]
    ttft, gap = report["ttft_ms"], report["gap_ms"]
    bad = i["lost"] or i["duplicated"] or i["reordered"] or i.get("foreign") or i.get("mismatched")
    rows = [
        ("wall time (s)", report["wall_s"]),
        ("requests ok / cancelled / failed",
         f"{r['ok']:,} / {r['cancelled']:,} / {r['failed']:,}  (of {r['total']:,})"),
        ("requests/s", report.get("requests_per_s")),
        ("tokens  (per s)", f"{report['tokens']:,}  ({report['tokens_per_s']:,.0f})"),
        ("events  (per s)", f"{report['events']:,}  ({report['events_per_s']:,.0f})"),
        ("TTFT ms p50 / p90 / p99 / max",
         " / ".join(_fmt(ttft[k]) for k in ("p50", "p90", "p99", "max"))),
        ("gap ms p50 / p99", f"{_fmt(gap['p50'])} / {_fmt(gap['p99'])}"),
        ("integrity lost / dup / reordered",
         Text(f"{i['lost']} / {i['duplicated']} / {i['reordered']}  "
              f"({i['checked_requests']:,} checked)", style="red" if bad else "green")),
        ("server tasks_living before -> after",
         f"{_fmt(s['tasks_living_before'])} -> {_fmt(s['tasks_living_after'])}"),
        ("server RSS MiB before -> after", f"{_mib(s['rss_before'])} -> {_mib(s['rss_after'])}"),
        ("client CPU s  (% of wall)", f"{_fmt(c['cpu_s'])}  ({c['cpu_percent']:.0f}%)"),
    ]  # fmt: skip
    if report.get("cancelled_by"):
        rows.append(("cancelled by", _counts(report["cancelled_by"])))
    if report.get("errors"):
        rows.append(("errors", Text(_counts(report["errors"]), style="red")))
    for name, value in rows:
        table.add_row(name, value if isinstance(value, Text) else _fmt(value))
    return table


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 1048576:,.1f}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items())
