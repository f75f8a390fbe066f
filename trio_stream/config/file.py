"""The configuration file, ``--config FILE``: TOML (docs/api.md section 1.3).

Its top-level tables::

    [serve]                      # any serve option, by its setting's name
    port = 8000
    first_token_timeout = 30

    [[upstream]]                 # one table per member
    name = "vllm-a"
    kind = "openai"              # openai | ollama | mock
    url = "http://10.0.0.1:8000/v1"
    api_key_env = "VLLM_KEY"     # or api_key = "..." (openai only)
    models = ["llama3", { name = "gpt-4o", upstream = "openai/gpt-4o" }]
    weight = 2                   # and max_streams, connect_timeout, ...

    [group."llama3"]             # options of the members serving "llama3"
    hedge_after_ms = 200

:func:`load` reads it into a :class:`ConfigFile`: the ``[serve]`` values
(typed, by :class:`~trio_stream.config.Settings` field) and the members
(:class:`~trio_stream.config.members.Upstreams`).  Every problem is reported
at once, each naming the file and the key (``config.toml: upstream[2].url:
must start with http:// or https://``).

Rules:

1. A top-level table that is not in :data:`SECTIONS` is an error naming it;
   so is an unknown key in any table, and a value of the wrong type.
2. ``[serve]`` takes exactly the ``serve`` options, written as their setting's
   name (``first_token_timeout``, ``api_keys``); it cannot name another file
   (``config``) or set the members (``[[upstream]]`` does).  The command line
   and the environment win over it (:mod:`trio_stream.cli`).
3. ``api_key_env`` names an environment variable read when the file is
   loaded; unset or empty is an error.  ``api_key`` and ``api_key_env``
   exclude each other.
4. Semantic checks of the members (a URL's scheme, unique names, a group
   naming a model someone serves, ...) are :func:`.members.problems`, shared
   with :meth:`Settings.validate <trio_stream.config.Settings.validate>`.

A new section is one more entry in :data:`SECTIONS`, a reader method and a
field of :class:`ConfigFile`.  ``[[key]]`` is the exception: it is reloaded
on ``SIGHUP`` without the rest of the file, so :mod:`trio_stream.limits.file`
reads it (and ``cli.serve`` checks it before anything starts).

This module never imports trio.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from . import Settings
from .members import GroupSpec, MemberSpec, ModelName, Upstreams
from .members import problems as member_problems

#: The top-level tables a file may have.  ``[[key]]`` (client keys and their
#: limits) is read and checked by :mod:`trio_stream.limits.file`, in the layer
#: that knows keys, at start and on every ``SIGHUP``: here it is only allowed.
SECTIONS = ("serve", "upstream", "group", "key")

#: ``[[upstream]]`` keys and the types they take (``float`` takes an integer too).
MEMBER_KEYS: dict[str, type] = {
    "name": str, "kind": str, "url": str, "api_key": str, "api_key_env": str, "models": list,
    "weight": float, "max_streams": int, "connect_timeout": float,
    "first_token_timeout": float, "token_timeout": float, "mock_delay_ms": float,
    "cool_after_failures": int, "cooldown_ms": float, "max_cooldown_ms": float,
    "probe": bool, "probe_interval_ms": float,
}  # fmt: skip
GROUP_KEYS: dict[str, type] = {"hedge_after_ms": float}


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """What a configuration file says."""

    path: str
    #: ``[serve]``: Settings field name -> value, as the file gave them.
    serve: Mapping[str, Any]
    #: ``[[upstream]]`` and ``[group]``; ``None`` if the file has no ``[[upstream]]``.
    upstreams: Upstreams | None


def load(path: str, environ: Mapping[str, str] = os.environ) -> ConfigFile:
    """Read and check ``path``.  Raises :class:`ConfigError` naming every problem."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    return parse(text, path, environ)


def parse(text: bytes | str, path: str, environ: Mapping[str, str] = os.environ) -> ConfigFile:
    """:func:`load` of a file's contents (``path`` names it in errors)."""
    try:
        data = tomllib.loads(text.decode() if isinstance(text, bytes) else text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    reader = _Reader(environ)
    result = reader.read(data, path)
    if reader.problems:
        raise ConfigError("; ".join(f"{path}: {key}: {msg}" for key, msg in reader.problems))
    return result


def serve_keys() -> dict[str, Any]:
    """The keys ``[serve]`` takes: each Settings field with a command-line
    option, except ``config``, and its type."""
    hints = typing.get_type_hints(Settings)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(Settings)
        if "cli" in f.metadata and f.name != "config"
    }


class _Reader:
    """Reads the parsed TOML into a :class:`ConfigFile`, collecting problems."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[tuple[str, str]] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append((key, message))

    def read(self, data: dict[str, Any], path: str) -> ConfigFile:
        for key in data:
            if key not in SECTIONS:
                self.problem(key, f"unknown table (known: {', '.join(SECTIONS)})")
        serve = self.serve(data.get("serve", {}))
        members = self.members(data.get("upstream"))
        groups = self.groups(data.get("group", {}))
        if members is None:
            if groups:
                self.problem("group", "needs [[upstream]] tables")
            return ConfigFile(path, serve, None)
        upstreams = Upstreams(members, groups)
        if not self.problems:  # the semantic checks assume well-typed tables
            self.problems.extend(member_problems(upstreams))
        if "upstream" in serve or "upstream_url" in serve or "upstream_api_key" in serve:
            self.problem("serve", "upstream, upstream_url and upstream_api_key are the "
                         "one-upstream shorthand: not with [[upstream]] tables")  # fmt: skip
        return ConfigFile(path, serve, upstreams)

    # -- [serve] ------------------------------------------------------------
    def serve(self, table: Any) -> dict[str, Any]:
        if not isinstance(table, dict):
            self.problem("serve", "must be a table")
            return {}
        known = serve_keys()
        out: dict[str, Any] = {}
        for key, value in table.items():
            hint = known.get(key)
            if hint is None:
                underscored = key.replace("-", "_")
                hint_text = f" (did you mean {underscored}?)" if underscored in known else ""
                self.problem(f"serve.{key}", f"unknown option{hint_text}")
                continue
            typed = _typed(value, hint)
            if typed is _WRONG:
                self.problem(f"serve.{key}", f"must be {_describe(hint)}")
            else:
                out[key] = typed
        return out

    # -- [[upstream]] ---------------------------------------------------------
    def members(self, tables: Any) -> tuple[MemberSpec, ...] | None:
        if tables is None:
            return None
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            self.problem("upstream", "must be [[upstream]] tables")
            return ()
        return tuple(self.member(t, f"upstream[{i}]") for i, t in enumerate(tables, 1))

    def member(self, table: dict[str, Any], at: str) -> MemberSpec:
        values = self.table(table, at, MEMBER_KEYS)
        for key in ("name", "kind"):
            if key not in table:
                self.problem(f"{at}.{key}", "missing")
        api_key = values.pop("api_key", None)
        env = values.pop("api_key_env", None)
        if api_key is not None and env is not None:
            self.problem(f"{at}.api_key_env", "api_key and api_key_env exclude each other")
        elif env is not None:
            api_key = self.environ.get(env) or None
            if api_key is None:
                self.problem(f"{at}.api_key_env", f"the environment variable {env} is unset")
        models = self.models(values.pop("models", None), f"{at}.models")
        values.setdefault("name", "")
        values.setdefault("kind", "")
        if models:
            values["models"] = models
        return MemberSpec(**values, api_key=api_key)

    def models(self, entries: list[Any] | None, at: str) -> tuple[ModelName, ...]:
        if entries is None:
            return ()
        out: list[ModelName] = []
        for i, entry in enumerate(entries, 1):
            if isinstance(entry, str):
                out.append(ModelName(entry, entry))
            elif isinstance(entry, dict):
                v = self.table(entry, f"{at}[{i}]", {"name": str, "upstream": str})
                if "name" not in v:
                    self.problem(f"{at}[{i}].name", "missing")
                else:
                    out.append(ModelName(v["name"], v.get("upstream", v["name"])))
            else:
                self.problem(f"{at}[{i}]", 'must be a name or { name = "...", upstream = "..." }')
        if not out and not entries:
            self.problem(at, 'must name at least one model ("*": any)')
        return tuple(out)

    # -- [group."<model>"] ---------------------------------------------------
    def groups(self, table: Any) -> tuple[GroupSpec, ...]:
        if not isinstance(table, dict) or not all(isinstance(t, dict) for t in table.values()):
            self.problem("group", 'must be [group."<model>"] tables')
            return ()
        return tuple(
            GroupSpec(model, **self.table(t, f"group.{model}", GROUP_KEYS))
            for model, t in table.items()
        )

    # -- any table ---------------------------------------------------------------
    def table(self, table: dict[str, Any], at: str, keys: dict[str, type]) -> dict[str, Any]:
        """The table's known, well-typed values; a problem for each other key."""
        out: dict[str, Any] = {}
        for key, value in table.items():
            hint = keys.get(key)
            if hint is None:
                self.problem(f"{at}.{key}", f"unknown key (known: {', '.join(keys)})")
                continue
            typed = _typed(value, hint)
            if typed is _WRONG:
                self.problem(f"{at}.{key}", f"must be {_describe(hint)}")
            else:
                out[key] = typed
        return out


_WRONG = object()


def _typed(value: Any, hint: Any) -> Any:
    """``value`` as a ``hint`` (a float from an integer, a tuple from a list),
    or ``_WRONG``."""
    if isinstance(hint, types.UnionType):  # X | None: TOML has no null, so an X
        (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return tuple(value) if ok else _WRONG
    if isinstance(value, bool) != (hint is bool):
        return _WRONG
    if hint is float:
        ok = isinstance(value, int | float) and not math.isnan(value)
        return float(value) if ok else _WRONG
    return value if isinstance(value, hint) else _WRONG


def _describe(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, "a list")
