"""The layout's rules, read from the source: no import circles among kdcli's modules, no
class defined inside a function, no module over 500 lines, and a bare ``kdcli --help`` that
imports none of the heavy libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kdcli"
MAX_LINES = 500
HEAVY = ("torch", "onnx", "onnxruntime", "transformers")


def _modules() -> dict[str, Path]:
    """Every module of kdcli by dotted name (a package by its ``__init__.py``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """The dotted names an import statement reaches: ``from a.b import c`` gives ``a.b.c``
    (a submodule, or a name in ``a.b``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the package, up level - 1 packages
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names]


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the kdcli modules it imports anywhere: at the top, in a function or under
    ``TYPE_CHECKING`` (a name imported from a module is an edge to that module)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(node, package):
                while target and target not in modules:  # the deepest module named
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One circle through the first module of a component, as the modules along it."""
    start, members = component[0], set(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & members):
            if w == start:
                return [*path, start]
            if w not in seen:
                seen.add(w)
                paths.append([*path, w])
    return component


def test_the_cycle_finder_finds_a_circle_and_its_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _path(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_a_name_from_a_package_is_an_edge_to_its_submodule():
    modules = _modules()
    graph = _edges(modules)
    assert "kdcli.data.base" in graph["kdcli.data.sources"]
    assert "kdcli.errors" in graph["kdcli.data.sources"]
    types = {"kdcli.data.base", "kdcli.data.text"}  # the types every source shares
    assert not any(m.startswith("kdcli.data.") and m not in types
                   for m in graph["kdcli.data.sources"])  # its entries: named, not imported


def test_no_import_circles():
    graph = _edges(_modules())
    circles = [" -> ".join(_path(graph, c)) for c in _cycles(graph)]
    assert circles == [], "import circles:\n" + "\n".join(circles)


def test_no_class_is_defined_inside_a_function():
    found = set()
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found |= {f"{name}:{c.lineno} {c.name} (in {node.name})"
                          for c in ast.walk(node) if isinstance(c, ast.ClassDef)}
    assert sorted(found) == [], "classes defined in functions:\n" + "\n".join(sorted(found))


def test_no_module_is_over_500_lines():
    long = [f"{name}: {n} lines" for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert long == [], f"modules over {MAX_LINES} lines:\n" + "\n".join(long)


def test_kdcli_help_imports_no_heavy_library():
    code = ("import sys\n"
            "sys.argv = ['kdcli', '--help']\n"
            "import kdcli.cli\n"
            "try:\n"
            "    kdcli.cli.main()\n"
            "except SystemExit:\n"
            "    pass\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "Usage" in out.stdout
    assert out.stderr.strip().splitlines()[-1] == "[]"


def test_the_commands_run_without_the_optional_libraries():
    """The base install (torch, onnx, onnxruntime, pyarrow, ...) runs every command on
    images and tables: importing the commands' modules imports no optional library (the
    text and test extras: tokenizers, transformers, scikit-learn, pandas). The quickstart of
    a fresh install once failed at export on ``import tokenizers``."""
    code = ("import sys\n"
            "import kdcli.export, kdcli.evaluate, kdcli.train, kdcli.soft_targets\n"
            "import kdcli.sweep, kdcli.calibrate, kdcli.inspection, kdcli.teachers.formats\n"
            "import kdcli.teachers.onnx, kdcli.teachers.kdcli_model\n"
            "print(sorted(m for m in ('tokenizers', 'transformers', 'sklearn', 'pandas',\n"
            "                         'scattertext') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout
