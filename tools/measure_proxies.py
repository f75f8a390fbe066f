"""Measure how streams end through real proxies: nginx's and HAProxy's defaults, and direct.

For each target, one stack runs for all its tries (see ``tools/proxies.py``):
a :class:`~tools.fakes.FakeUpstream` in this process (one token every
``--gap`` seconds), a ``trio-stream serve`` subprocess using it as its OpenAI
upstream, and the proxy on its defaults plus one ``proxy_pass`` line.  A raw
HTTP/1.1 client in this process then runs ``--tries`` streams one after
another.  All times are ``trio.current_time()`` in this process:

* **last token -> [DONE]**: the fake upstream sent its last token (its
  finish chunk and ``[DONE]`` follow at once) -> the client has
  ``data: [DONE]``;
* **[DONE] -> end**: the client has ``[DONE]`` -> it sees the end of the
  response (chunked terminator, or EOF for a response that ends with the
  connection);
* **first token**: the request is sent -> the client has the first delta
  (the upstream sends it ``--gap`` after the request);
* **leave -> upstream closed**: a second stream per try, whose client closes
  its socket after the first event -> the fake upstream sees its connection
  close.

Usage::

    .venv/bin/python tools/measure_proxies.py --tries 20

nginx and HAProxy come from ``make services``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also as a plain script

from tools.fakes import mock_plan
from tools.proxies import PROXIES, leave_mid_stream, open_stack, timed_stream

TARGETS = ("direct", *PROXIES)
TRY_TIMEOUT = 30.0
LEAVE_TOKENS = 10_000  # only a cancellation ends such a stream in time


@dataclass(frozen=True)
class Sample:
    """One try's figures, in seconds."""

    to_done: float  # upstream's last token -> client's [DONE]
    to_end: float  # client's [DONE] -> end of the response
    first: float  # request sent -> first delta
    leave: float  # client's close -> upstream connection closed


COLUMNS = (
    ("last token -> [DONE]", "to_done"),
    ("[DONE] -> end", "to_end"),
    ("first token", "first"),
    ("leave -> upstream closed", "leave"),
)


async def measure(
    target: str, tries: int, gap: float, tokens: int, directory: Path
) -> list[Sample]:
    """``tries`` samples through ``target`` (``direct``, ``nginx`` or ``haproxy``)."""
    samples = []
    async with open_stack(directory / target, target, mock_plan("openai", gap)) as stack:
        for i in range(tries):
            with trio.fail_after(TRY_TIMEOUT):
                timeline, last_token = await timed_stream(stack, f"measure {i}", tokens)
                leave = await leave_mid_stream(stack, f"leave {i}", LEAVE_TOKENS)
            if timeline.last.data != "[DONE]" or timeline.end is None:
                raise RuntimeError(f"{target}: stream {i} did not end with [DONE]")
            samples.append(Sample(
                to_done=timeline.done - last_token, to_end=timeline.end - timeline.done,
                first=timeline.first_delta - timeline.sent, leave=leave,
            ))  # fmt: skip
    return samples


async def measure_all(
    targets: list[str], tries: int, gap: float, tokens: int
) -> dict[str, list[Sample]]:
    with tempfile.TemporaryDirectory(prefix="measure-proxies-") as tmp:
        return {t: await measure(t, tries, gap, tokens, Path(tmp)) for t in targets}


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


def report(results: dict[str, list[Sample]]) -> str:
    """A table: for each target and figure, the median and the max in ms."""
    head = f"{'target':<10}" + "".join(f"  {name:>24}" for name, _ in COLUMNS)
    sub = f"{'':<10}" + "".join(f"  {'median':>12}{'max':>12}" for _ in COLUMNS)
    lines = [head, sub]
    for target, samples in results.items():
        cells = []
        for _, attr in COLUMNS:
            values = [getattr(s, attr) for s in samples]
            cells.append(f"  {_ms(statistics.median(values)):>12}{_ms(max(values)):>12}")
        lines.append(f"{target:<10}" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=20, help="streams per target (default 20)")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between tokens (0.05)")
    parser.add_argument("--tokens", type=int, default=10, help="tokens per stream (default 10)")
    parser.add_argument(
        "--target", action="append", choices=TARGETS,
        help="measure only this target (repeatable; default: all)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    targets = args.target or list(TARGETS)
    results = trio.run(measure_all, targets, args.tries, args.gap, args.tokens)
    print(f"{args.tries} tries per target, {args.tokens} tokens {args.gap * 1000:.0f} ms apart; ms")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
