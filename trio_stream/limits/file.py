"""The key tables of the configuration file (``--config FILE``, TOML).

Only the ``[[key]]`` tables are read here (:func:`.keys.parse_keys` checks
them); the file's other tables are not this module's.  A file that cannot be
read, is not TOML or has a bad key is refused whole:
:class:`~trio_stream.errors.ConfigError` names the file, and every bad key
by its number and field.  At start the server then exits (status 2); on
``SIGHUP`` the keys in force stay.

Never imports trio.
"""

from __future__ import annotations

import tomllib

from ..errors import ConfigError
from .keys import KeyDef, parse_keys


def read_keys(text: bytes | str, path: str) -> tuple[KeyDef, ...]:
    """The ``[[key]]`` tables of a file's contents (``path`` names it in errors)."""
    try:
        data = tomllib.loads(text.decode() if isinstance(text, bytes) else text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return parse_keys(data.get("key", []))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def load_keys(path: str) -> tuple[KeyDef, ...]:
    """Read ``path`` and return its keys (:func:`read_keys`)."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    return read_keys(text, path)
