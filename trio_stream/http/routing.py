"""The routing table's vocabulary: a route, and the matcher of the raw-ASGI ones.

Every route of the app is one :class:`Route` in one table
(:func:`trio_stream.http.app.routes`).  A route is either *raw* -- a
streaming endpoint that owns its request nursery, matched here before Quart
sees the request -- or a Quart view (the JSON routes and the playground),
which the app registers with Quart from the same table.  Rules use Quart's
syntax (``/v1/runs/<run_id>/events``); a ``<name>`` matches one path segment.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

#: A raw route's handler: ``(service, scope, receive, send, *path_args)``,
#: returning the coroutine the request task awaits.
RawHandler = Callable[..., Coroutine[Any, Any, None]]

_PARAM = re.compile(r"<([a-z_]+)>")


@dataclass(frozen=True, slots=True)
class Route:
    """``method rule`` -> a raw handler or a Quart view (exactly one)."""

    method: str
    rule: str
    raw: RawHandler | None = None
    view: Callable[..., Coroutine[Any, Any, Any]] | None = None

    def __post_init__(self) -> None:
        if (self.raw is None) == (self.view is None):
            raise ValueError(f"{self.method} {self.rule}: a route is raw or a view, not both")


class RawRoutes:
    """The raw routes, by path: exact paths in a dict, the rest by pattern."""

    def __init__(self, routes: list[Route]) -> None:
        self._exact: dict[str, dict[str, RawHandler]] = {}
        self._patterns: list[tuple[re.Pattern[str], dict[str, RawHandler]]] = []
        self._rules: list[tuple[re.Pattern[str], str]] = []
        by_rule: dict[str, dict[str, RawHandler]] = {}
        for route in routes:
            if route.raw is not None:
                by_rule.setdefault(route.rule, {})[route.method] = route.raw
        for rule, methods in by_rule.items():
            if "<" not in rule:
                self._exact[rule] = methods
            else:
                pattern = re.compile(_PARAM.sub(r"([^/]+)", rule))
                self._patterns.append((pattern, methods))
                self._rules.append((pattern, rule))

    def match(self, path: str) -> tuple[dict[str, RawHandler], tuple[str, ...]] | None:
        """The handlers of ``path`` by method, and its path arguments; None if
        no raw route has this path (then it is Quart's)."""
        methods = self._exact.get(path)
        if methods is not None:
            return methods, ()
        for pattern, methods in self._patterns:
            if m := pattern.fullmatch(path):
                return methods, m.groups()
        return None

    def rule(self, path: str) -> str:
        """The raw route's rule that ``path`` matches (``/v1/runs/<run_id>/events``),
        else "" (a trace's ``http.route``; never on the path without tracing)."""
        if path in self._exact:
            return path
        for pattern, rule in self._rules:
            if pattern.fullmatch(path):
                return rule
        return ""


def allow(methods: dict[str, RawHandler]) -> tuple[tuple[bytes, bytes]]:
    """The ``Allow`` header of a 405 (RFC 9110)."""
    return ((b"allow", ", ".join(sorted(methods)).encode()),)
