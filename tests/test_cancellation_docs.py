"""Every public async function says what cancelling it does, as trio's own do.

A reader of trio-stream must be able to tell, from the docstring alone,
whether a call checkpoints and what a ``Cancelled`` in it leaves behind
(docs/design.md section 11 lists the shields).  The check is textual: the
docstring must state it in trio's words: "Cancellation: ...", what a
"Cancelled" does, "cancellable", or whether it is a "checkpoint" (a verb
such as "Cancel a run" does not count).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "trio_stream"
STATED = re.compile(r"Cancellation|Cancelled|[Cc]ancellable|checkpoint")


def _public_async_functions() -> list[tuple[str, ast.AsyncFunctionDef]]:
    """(qualified name, node) of every ``async def`` not starting with ``_``,
    at module level or in a class (nested helpers inside functions excluded)."""
    found: list[tuple[str, ast.AsyncFunctionDef]] = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, ast.AsyncFunctionDef) and not node.name.startswith("_"):
                found.append((prefix + node.name, node))

    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        visit(ast.parse(path.read_text()).body, f"{module}.")
    return found


def test_the_walk_finds_the_public_async_functions() -> None:
    """The walk sees the API (a guard against a check that checks nothing)."""
    names = {name for name, _ in _public_async_functions()}
    assert "trio_stream.server.serve.serve" in names
    assert "trio_stream.runs.manager.RunManager.drive" in names
    assert len(names) > 100


def test_every_public_async_function_states_its_cancellation() -> None:
    """No public async function lacks a statement of its cancellation behaviour."""
    missing = [
        name
        for name, node in _public_async_functions()
        if not STATED.search(ast.get_docstring(node) or "")
    ]
    assert missing == []
