"""The ``[[key]]`` tables of the configuration file: typed key definitions.

Each table is one client key (docs/api.md section 2.1)::

    [[key]]
    name = "alice"                 # 1-64 of A-Z a-z 0-9 . _ -; in metrics and logs
    secret = "sk-alice-..."        # or: sha256 = "<64 hex digits of the secret's SHA-256>"
    tenant = "acme"                # optional, default: the name
    rpm = 60                       # optional: requests per minute
    tpm = 100000                   # optional: prompt + completion tokens per minute
    max_streams = 4                # optional: streams open at once
    tokens_per_day = 1000000       # optional budgets (UTC day, UTC month)
    tokens_per_month = 20000000
    models = ["gpt-4o-mini"]       # optional: the only models it may use

:func:`parse_keys` takes the already parsed TOML value (the list of tables)
and returns :class:`KeyDef` s, or raises :class:`~trio_stream.errors.ConfigError`
naming every problem by the key's number (from 1) and field.  A secret is
kept only as its SHA-256: it is never stored, logged or compared in
variable time (:mod:`trio_stream.http.service`'s ``Auth``).

Never imports trio.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .base import Limits

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TENANT = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_LIMITS = ("rpm", "tpm", "max_streams", "tokens_per_day", "tokens_per_month")
FIELDS = frozenset({"name", "secret", "sha256", "tenant", "models", *_LIMITS})
#: Tenants of ``--api-key`` keys start with it (a hash), so a [[key]] may not.
RESERVED_TENANT_PREFIX = "k_"


@dataclass(frozen=True, slots=True)
class KeyDef:
    """One key of the file."""

    name: str
    digest: bytes  # SHA-256 of the secret
    tenant: str
    limits: Limits
    models: frozenset[str] | None  # None: every model

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def __repr__(self) -> str:  # never the digest: it identifies the secret
        return f"KeyDef(name={self.name!r}, tenant={self.tenant!r}, limits={self.limits!r})"


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_keys(value: object) -> tuple[KeyDef, ...]:
    """The ``[[key]]`` tables as :class:`KeyDef` s; :class:`ConfigError`
    naming every problem (``key 2 ("bob"): rpm must be ...``)."""
    if not isinstance(value, list):
        raise ConfigError("key must be an array of tables ([[key]])")
    problems: list[str] = []
    keys: list[KeyDef] = []
    names: dict[str, int] = {}
    digests: dict[bytes, int] = {}
    for number, table in enumerate(value, 1):
        where = f"key {number}"
        if not isinstance(table, dict):
            problems.append(f"{where}: must be a table")
            continue
        if isinstance(table.get("name"), str):
            where += f" ({table['name']!r})"
        found = _parse_one(table, where, problems)
        if found is None:
            continue
        if found.name in names:
            problems.append(f"{where}: name is also key {names[found.name]}'s")
        if found.digest in digests:
            problems.append(f"{where}: its secret is also key {digests[found.digest]}'s")
        names.setdefault(found.name, number)
        digests.setdefault(found.digest, number)
        keys.append(found)
    if problems:
        raise ConfigError("; ".join(problems))
    return tuple(keys)


def _parse_one(table: dict[str, Any], where: str, problems: list[str]) -> KeyDef | None:
    before = len(problems)
    for field in sorted(set(table) - FIELDS):
        problems.append(f"{where}: unknown field {field!r}")
    name = table.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        problems.append(f"{where}: name must be 1-64 characters of A-Z a-z 0-9 . _ -")
    digest = _digest(table, where, problems)
    tenant = table.get("tenant", name)
    if "tenant" in table and (
        not isinstance(tenant, str)
        or not _TENANT.fullmatch(tenant)
        or tenant.startswith(RESERVED_TENANT_PREFIX)
    ):
        problems.append(
            f"{where}: tenant must be 1-64 characters of A-Z a-z 0-9 . _ : -, "
            f"not starting with {RESERVED_TENANT_PREFIX!r}"
        )
    amounts: dict[str, int] = {}
    for field in _LIMITS:
        if field not in table:
            continue
        amount = table[field]
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
            problems.append(f"{where}: {field} must be a whole number >= 1")
        else:
            amounts[field] = amount
    models = table.get("models")
    if "models" in table and (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, str) and m for m in models)
    ):
        problems.append(f"{where}: models must be a non-empty list of model names")
    if len(problems) > before:
        return None
    assert isinstance(name, str)
    assert isinstance(tenant, str)
    assert digest is not None
    return KeyDef(
        name, digest, tenant, Limits(**amounts), None if models is None else frozenset(models)
    )


def _digest(table: dict[str, Any], where: str, problems: list[str]) -> bytes | None:
    secret, sha = table.get("secret"), table.get("sha256")
    if ("secret" in table) == ("sha256" in table):
        problems.append(f"{where}: give exactly one of secret and sha256")
        return None
    if "secret" in table:
        if not isinstance(secret, str) or not secret or secret != secret.strip():
            problems.append(f"{where}: secret must be non-empty, without surrounding spaces")
            return None
        return digest_of(secret)
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        problems.append(f"{where}: sha256 must be 64 hexadecimal digits")
        return None
    return bytes.fromhex(sha)
