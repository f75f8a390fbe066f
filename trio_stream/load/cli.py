"""``trio-stream load``: placeholder until the load generator lands."""

from __future__ import annotations

import click


@click.command()
def load() -> None:
    """The load generator (not yet built)."""
    raise click.UsageError("the load generator is not built yet")
