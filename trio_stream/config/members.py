"""The upstream members a server routes to, and the options of their groups.

A **member** is one upstream server (an ``[[upstream]]`` table of the
configuration file, docs/api.md section 1.3); a **group** is every member that
serves one model name.  These are plain frozen values: the configuration file
(:mod:`.file`) builds them, :class:`~trio_stream.config.Settings` carries them,
:mod:`trio_stream.core.router` decides with them.

Without a configuration file, ``--upstream``/``--upstream-url`` are the
one-upstream shorthand: :func:`shorthand` makes the one member, which serves
every model (``"*"``) and never cools down (with no second member to turn to,
a request that finds the upstream failing gets its error, as before).

This module never imports trio.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

KINDS = ("openai", "ollama", "mock")
#: The model name that makes a member serve every model no member names.
ANY_MODEL = "*"
#: A member's name: it is a metric label and a log value.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


@dataclass(frozen=True, slots=True)
class ModelName:
    """A model a member serves: ``name`` as clients ask for it, ``upstream``
    as the member knows it (sent in the request's ``model``)."""

    name: str
    upstream: str


@dataclass(frozen=True, slots=True)
class MemberSpec:
    """One upstream server.  ``None`` timeouts are the ``serve`` options'."""

    name: str
    kind: str
    url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    models: tuple[ModelName, ...] = (ModelName(ANY_MODEL, ANY_MODEL),)
    #: Share of the group's streams, relative to the other members' weights.
    weight: float = 1.0
    #: Streams it may carry at once (``None``: no limit of its own).
    max_streams: int | None = None
    connect_timeout: float | None = None
    first_token_timeout: float | None = None
    token_timeout: float | None = None
    #: The mock's gap between tokens (``kind = "mock"`` only).
    mock_delay_ms: float | None = None
    #: Consecutive failures that put it in cooldown (0: never cools down).
    cool_after_failures: int = 1
    #: The first cooldown; each further failure doubles it, up to ``max_cooldown_ms``.
    cooldown_ms: float = 1000.0
    max_cooldown_ms: float = 30000.0
    #: While it cools down, ask ``GET {url}/models`` every ``probe_interval_ms``;
    #: an answer ends the cooldown at once.
    probe: bool = False
    probe_interval_ms: float = 1000.0

    def upstream_model(self, model: str) -> str | None:
        """The name to send for ``model``, or ``None`` if it does not serve it."""
        for m in self.models:
            if m.name == model:
                return m.upstream
        return model if self.serves_any else None

    @property
    def serves_any(self) -> bool:
        return any(m.name == ANY_MODEL for m in self.models)


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """Options of the group serving ``model`` (a ``[group."<model>"]`` table)."""

    model: str
    #: Start the request on a second member if the first has sent no token by
    #: then (``None``: never hedge).
    hedge_after_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Upstreams:
    """Every member, and the options of the groups that have some."""

    members: tuple[MemberSpec, ...]
    groups: tuple[GroupSpec, ...] = ()

    def group(self, model: str) -> GroupSpec:
        for g in self.groups:
            if g.model == model:
                return g
        return GroupSpec(model)


def shorthand(kind: str, url: str | None, api_key: str | None) -> Upstreams:
    """The one member of ``--upstream KIND --upstream-url URL``: every model, no cooldown."""
    return Upstreams((MemberSpec(kind, kind, url, api_key, cool_after_failures=0),))


def problems(upstreams: Upstreams) -> list[tuple[str, str]]:
    """What is wrong with ``upstreams``, as ``(key, message)`` pairs; keys
    are written as in the file (``upstream[2].url``, 1-based)."""
    p: list[tuple[str, str]] = []
    if not upstreams.members:
        p.append(("upstream", "at least one [[upstream]] table is needed"))
    seen: dict[str, int] = {}
    served: set[str] = set()
    for i, m in enumerate(upstreams.members, 1):
        at = f"upstream[{i}]"
        if not NAME.match(m.name):
            p.append((f"{at}.name", "must be 1-64 letters, digits, '_', '.', '-'"))
        elif m.name in seen:
            p.append((f"{at}.name", f"{m.name!r} is already upstream[{seen[m.name]}]'s name"))
        seen.setdefault(m.name, i)
        if m.kind not in KINDS:
            p.append((f"{at}.kind", f"must be one of {', '.join(KINDS)}"))
        if m.kind == "mock":
            if m.url is not None:
                p.append((f"{at}.url", "a mock upstream has no url"))
        elif not m.url:
            p.append((f"{at}.url", f'needed for kind = "{m.kind}"'))
        elif not m.url.startswith(("http://", "https://")):
            p.append((f"{at}.url", "must start with http:// or https://"))
        if m.api_key is not None and m.kind != "openai":
            p.append((f"{at}.api_key", "only an openai upstream is sent a key"))
        if m.kind != "mock" and m.mock_delay_ms is not None:
            p.append((f"{at}.mock_delay_ms", 'only for kind = "mock"'))
        if not m.models:
            p.append((f"{at}.models", 'must name at least one model ("*": any)'))
        names = [x.name for x in m.models]
        for j, x in enumerate(m.models, 1):
            if not x.name or not x.upstream:
                p.append((f"{at}.models[{j}]", "names must be non-empty"))
            elif names.index(x.name) != j - 1:
                p.append((f"{at}.models[{j}]", f"{x.name!r} is listed twice"))
            elif x.name == ANY_MODEL and x.upstream != ANY_MODEL:
                p.append((f"{at}.models[{j}]", '"*" cannot be renamed'))
        served.update(names)
        if not (m.weight > 0 and math.isfinite(m.weight)):
            p.append((f"{at}.weight", "must be > 0"))
        if m.max_streams is not None and m.max_streams < 1:
            p.append((f"{at}.max_streams", "must be >= 1"))
        for key in ("connect_timeout", "first_token_timeout", "token_timeout"):
            value = getattr(m, key)
            if value is not None and not value > 0:
                p.append((f"{at}.{key}", "must be > 0"))
        if m.mock_delay_ms is not None and not m.mock_delay_ms >= 0:
            p.append((f"{at}.mock_delay_ms", "must be >= 0"))
        if m.cool_after_failures < 0:
            p.append((f"{at}.cool_after_failures", "must be >= 0 (0: never)"))
        if not 0 < m.cooldown_ms <= m.max_cooldown_ms:
            p.append((f"{at}.cooldown_ms", "must be > 0 and <= max_cooldown_ms"))
        if not (m.probe_interval_ms > 0 and math.isfinite(m.probe_interval_ms)):
            p.append((f"{at}.probe_interval_ms", "must be > 0"))
        if m.probe and m.cool_after_failures == 0:
            p.append((f"{at}.probe", "a member that never cools down (cool_after_failures = 0) "
                      "is never probed"))  # fmt: skip
    for g in upstreams.groups:
        at = f"group.{g.model}"
        if g.model not in served and ANY_MODEL not in served:
            p.append((at, f"no [[upstream]] serves the model {g.model!r}"))
        if g.hedge_after_ms is not None and not g.hedge_after_ms > 0:
            p.append((f"{at}.hedge_after_ms", "must be > 0"))
    return p
