"""The package's layout draws its layers (docs/design.md section 2).

Each test walks the source with :mod:`ast` -- every import counts, those
inside functions and under ``TYPE_CHECKING`` included -- so a lazy import
cannot hide an upward edge or a circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "trio_stream"

#: Low to high.  A module may import its own layer and the layers below it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "config", "logs", "metrics", "tracing"),  # foundation (tracing: the seam)
    ("core",),  # sans-IO: the run log, the lifecycle table, the session table
    ("wire",),  # sans-IO: SSE, request parsing, chunks, Responses events, usage
    ("upstream",),
    ("store",),
    ("shared", "limits"),  # beside each other: both hold state in Redis
    ("runs",),
    ("http",),
    ("server",),
    ("__init__", "__main__", "cli", "load"),  # entry points
)
#: Packages that never import trio (and so are tested synchronously).
SANS_IO = ("core", "wire")
MAX_TOP_MODULES = 8


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package)."""
    out: dict[str, tuple[Path, bool]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["trio_stream", *path.relative_to(PACKAGE).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join(parts)] = (path, is_package)
    return out


MODULES = _modules()


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports(module: str) -> set[str]:
    """The package's modules that ``module`` imports, anywhere in its body."""
    path, is_package = MODULES[module]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, is_package)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: _imports(m) for m in MODULES}


def _unit(module: str) -> str:
    """The top-level module or subpackage that ``module`` belongs to."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _layer(module: str) -> int:
    unit = _unit(module)
    for rank, units in enumerate(LAYERS):
        if unit in units:
            return rank
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_every_module_is_in_a_layer() -> None:
    """Every module sits in the package of a known layer."""
    for module in MODULES:
        _layer(module)


def test_no_upward_import() -> None:
    """No module imports a module of a higher layer."""
    upward = [
        f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets if _layer(t) > _layer(m)
    ]
    assert upward == []


def test_no_circle_between_modules() -> None:
    """The module import graph has no circle."""
    assert _cycles(GRAPH) == []


def test_no_circle_between_packages() -> None:
    """Collapsed to its top-level modules and subpackages, the graph has no circle."""
    units: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        here = _unit(module)
        units.setdefault(here, set()).update(_unit(t) for t in targets if _unit(t) != here)
    assert _cycles(units) == []


def test_sans_io_layers_never_import_trio() -> None:
    """The sans-IO packages import no trio (and no hypercorn, h11 or h2)."""
    offenders = []
    for module, (path, _) in MODULES.items():
        if _unit(module) not in SANS_IO:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                if name.split(".")[0] in ("trio", "hypercorn", "h11", "h2", "anyio"):
                    offenders.append(f"{module} imports {name}")
    assert offenders == []


def test_few_modules_at_the_top() -> None:
    """At most eight modules at the package's top (``__init__`` and ``__main__`` count)."""
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top


def test_only_the_load_command_imports_the_load_generator() -> None:
    """Importing the package, the server or the CLI does not import ``trio_stream.load``
    (only running ``trio-stream load`` does), checked in a fresh interpreter."""
    code = (
        "import sys, trio_stream, trio_stream.cli, trio_stream.server.serve, "
        "trio_stream.server.signals, trio_stream.server.workers\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('trio_stream.load'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_tools_do_not_import_tests() -> None:
    """``tools/`` stands on the package (and itself), never on ``tests/``."""
    tools = PACKAGE.parent / "tools"
    offenders = []
    for path in sorted(tools.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "tests"]
    assert offenders == []


#: The HTTP answers of :mod:`trio_stream.errors` (``ApiError`` and its factories).
HTTP_ERRORS = frozenset(
    {
        "ApiError", "bad_request", "unauthorized", "not_found", "method_not_allowed",
        "unknown_route", "too_large", "body_timeout", "too_many_streams", "shutting_down",
        "unavailable", "model_not_found",
    }
)  # fmt: skip
#: Layers that speak no HTTP: they raise their own exceptions, which the HTTP
#: layer answers.  (``wire/`` is the protocol itself: its request parser's
#: errors are the OpenAI 400 bodies.)
NO_HTTP = ("core", "upstream", "store", "shared", "limits", "runs")
MAX_CLASS_LINES = 300


def test_http_errors_are_raised_only_in_the_http_layer() -> None:
    """The layers below ``http/`` (but the wire protocol) import no HTTP error."""
    offenders = []
    for module, (path, is_package) in MODULES.items():
        if _unit(module) not in NO_HTTP:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if _resolve(node, module, is_package) != "trio_stream.errors":
                    continue
                names = {a.name for a in node.names} & HTTP_ERRORS
                offenders += [f"{module}: {n}" for n in sorted(names)]
    assert offenders == []


def test_no_class_is_over_300_lines() -> None:
    """Every class of the package fits in 300 lines."""
    long = []
    for module, (path, _) in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    long.append(f"{module}.{node.name}: {lines}")
    assert long == []


def test_no_two_classes_share_a_name() -> None:
    """Each class (and each capitalised type alias) of the package has a name
    of its own: a reader who greps ``class Outcome`` finds one."""
    where: dict[str, list[str]] = {}
    for module, (path, _) in MODULES.items():
        tree = ast.parse(path.read_text())
        names = [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, ast.AnnAssign):
                targets = [node.target]
            names += [
                t.id
                for t in targets
                if isinstance(t, ast.Name) and t.id[:1].isupper() and not t.id.isupper()
            ]
        for name in names:
            where.setdefault(name, []).append(module)
    assert {name: mods for name, mods in where.items() if len(mods) > 1} == {}
