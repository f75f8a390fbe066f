"""The ``trio-stream`` command line (docs/api.md section 1).

Every option of ``serve`` is built from a field of
:class:`~trio_stream.config.Settings`: its name, type, default and help (see
:func:`settings_options`).  There is no second list of defaults to drift.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click
import trio

from .config import CLI, Settings
from .config.file import ConfigFile, load
from .errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])

#: A setting of one of these types is an option taking one value of it.
_SCALARS = (str, int, float)


def _env(name: str) -> str:
    """The environment variable of a setting: ``TRIO_STREAM_<NAME>``."""
    return "TRIO_STREAM_" + name.upper().replace("-", "_")


def _value_type(hint: Any, cli: CLI) -> Any:
    """The click type of a one-value option (``X | None`` takes an ``X``)."""
    if cli.choices:
        return click.Choice(cli.choices)
    if isinstance(hint, types.UnionType):
        (hint,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint not in _SCALARS:
        raise TypeError(f"no command-line type for a setting of type {hint!r}")
    return hint


def settings_option(field: dataclasses.Field[Any], hint: Any) -> Callable[[F], F]:
    """The click option of one :class:`Settings` field.

    ``bool`` is an on/off pair (``--coalesce/--no-coalesce``); ``tuple[str,
    ...]`` (the client keys) is a repeatable option, whose environment
    variable :func:`settings_from` reads; anything else takes one value, with
    the field's default shown in ``--help``.
    """
    cli = field.metadata.get("cli")
    if not isinstance(cli, CLI):
        raise TypeError(f"Settings.{field.name} has no option: declare it with config.setting()")
    name = cli.flag or field.name.replace("_", "-")
    if field.name == "config":
        return click.option(
            f"--{name}", field.name, type=str, default=None, envvar=_env(field.name),
            is_eager=True, expose_value=True, callback=_read_config, help=cli.help,
        )  # fmt: skip
    if hint is bool:
        return click.option(
            f"--{name}/--no-{name}", field.name, default=field.default, envvar=_env(field.name),
            show_default=True, help=cli.help,
        )  # fmt: skip
    if typing.get_origin(hint) is tuple:
        return click.option(f"--{name}", field.name, multiple=True, default=(), help=cli.help)
    return click.option(
        f"--{name}", field.name, type=_value_type(hint, cli), default=field.default,
        envvar=_env(field.name), show_default=field.default is not None, help=cli.help,
    )  # fmt: skip


def _read_config(ctx: click.Context, _: click.Parameter, path: str | None) -> ConfigFile | None:
    """``--config FILE`` (eager: read before every other option): its
    ``[serve]`` values become the options' defaults, so the command line and
    the environment win over the file, and the file over the built-in default."""
    if path is None:
        return None
    try:
        config = load(path)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param_hint="--config") from exc
    ctx.default_map = {**(ctx.default_map or {}), **config.serve}
    return config


def settings_options(command: F) -> F:
    """Give ``command`` one option per :class:`Settings` field with one (those
    set only by the configuration file have none), in field order."""
    hints = typing.get_type_hints(Settings)
    for field in reversed(dataclasses.fields(Settings)):  # the last one applied is listed first
        if "cli" in field.metadata:
            command = settings_option(field, hints[field.name])(command)
    return command


def settings_from(options: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> Settings:
    """The validated :class:`Settings` of parsed ``serve`` options.

    Client keys are those of ``--api-key`` plus those of
    ``TRIO_STREAM_API_KEYS=k1,k2``.  ``config`` is the :class:`ConfigFile`
    that ``--config`` read (its ``[serve]`` values are already the options'
    defaults); its members become ``Settings.upstreams``.  Raises
    :class:`ConfigError`.
    """
    env_keys = environ.get(_env("api_keys"), "")
    keys = (*options["api_keys"], *(k.strip() for k in env_keys.split(",") if k.strip()))
    config = options.get("config")
    file: dict[str, Any] = {"config": None}
    if isinstance(config, ConfigFile):
        file = {"config": config.path, "upstreams": config.upstreams}
    return Settings(**{**options, "api_keys": keys, **file}).validate()


class _Commands(click.Group):
    """``serve``, and ``load``, whose module (the load generator, about 2,000
    lines) is imported only when ``load`` is asked for: serving never loads it."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "load"})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name != "load":
            return super().get_command(ctx, cmd_name)
        try:
            from .load.cli import load
        except ImportError:  # pragma: no cover - the load generator is optional
            return None
        return load


@click.group(cls=_Commands)
@click.version_option(package_name="trio-stream")
def main() -> None:
    """trio-stream: leak-free OpenAI-compatible SSE streaming on Trio."""


@main.command()
@settings_options
def serve(**options: Any) -> None:
    """Run the server (hypercorn trio worker, quart-trio app)."""
    try:
        settings = settings_from(options)
        if settings.config:  # a bad key file is refused before anything starts
            from .http.service import check_keys

            check_keys(settings)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if settings.workers > 1:
        from .server import workers

        workers.run(settings)
        return
    from .server.signals import serve_until_signal, tune_gc

    tune_gc()
    trio.run(serve_until_signal, settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
