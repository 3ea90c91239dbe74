"""The package's import graph: nothing imports the plugin entry point, and no modules import
each other in a circle. Read from the source with `ast`, so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import sala_sglang

PACKAGE_DIR = Path(sala_sglang.__file__).parent
PLUGIN = "sala_sglang.plugin"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or inside a function or class, except those under
    `if TYPE_CHECKING:`, which never run."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _imported(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> set[str]:
    """Names that `node`, written in `module`, imports."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = node.module or ""
    if node.level:  # relative: from its own package (a package's __init__ is its own package)
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    # `from package import name` imports the submodule `name` when there is one.
    return {base} | {f"{base}.{alias.name}" for alias in node.names}


def _imported_by_string(tree: ast.Module) -> set[str]:
    """Names passed as a literal to `importlib.import_module(...)` or `__import__(...)`."""
    names = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        arg = node.args[0]
        if name in ("import_module", "__import__") and isinstance(arg, ast.Constant):
            names.add(str(arg.value))
    return names


def imports_of(module: str, modules: dict[str, Path] = MODULES) -> set[str]:
    """Modules of the package that `module` imports (statements anywhere in it, and literal
    `import_module` calls), with the packages whose `__init__` those imports run."""
    path = modules[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set(_imported_by_string(tree))
    for node in _import_nodes(tree):
        names |= _imported(module, path.name == "__init__.py", node)
    found = set()
    for name in names:
        # Importing a.b.c runs a/__init__ and a/b/__init__ first, except those the importer is
        # itself inside (already running when it runs).
        parts = name.split(".")
        for i in range(2, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in modules and prefix != module and not module.startswith(prefix + "."):
                found.add(prefix)
    return found


def import_graph(modules: dict[str, Path] = MODULES) -> dict[str, set[str]]:
    """module -> the package's modules it imports."""
    return {module: imports_of(module, modules) for module in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_every_module_of_the_package_is_read() -> None:
    for name in ("plugin", "cli", "server_args", "models", "attention.backend", "testing.compare"):
        assert f"sala_sglang.{name}" in MODULES


def test_no_module_imports_the_plugin() -> None:
    # The entry point is a leaf (STYLE.md, vLLM's plugin pattern). Imports inside functions count
    # too: a lazy import of the plugin is still a way back to it.
    importers = sorted(m for m in MODULES if m != PLUGIN and PLUGIN in imports_of(m))
    assert importers == [], f"{importers} import {PLUGIN}; import sala_sglang.server_args instead"


def test_no_import_cycle() -> None:
    # Imports inside functions count as well as those at module level: a lazy import only delays
    # the load, the two modules still depend on each other (the old cli <-> benchmarking pair
    # was such a circle, one side lazy). Imports under `if TYPE_CHECKING:` never run and are left
    # out.
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _graph_of(sources: dict[str, str], tmp_path: Path) -> dict[str, set[str]]:
    """The import graph of a made-up package `sala_sglang` with these module sources."""
    modules = {}
    for name, source in sources.items():
        path = tmp_path / (name.replace(".", "/") + ".py")
        if any(other.startswith(name + ".") for other in sources):
            path = tmp_path / name.replace(".", "/") / "__init__.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
        modules[name] = path
    return import_graph(modules)


def test_the_checks_catch_each_way_of_importing_the_plugin(tmp_path: Path) -> None:
    ways = [
        "import sala_sglang.plugin",
        "import sala_sglang.plugin as p",
        "from sala_sglang import plugin",
        "from sala_sglang.plugin import register",
        "from .. import plugin",
        "from ..plugin import register",
        "def f():\n    from sala_sglang.plugin import register",
        "import importlib\nimportlib.import_module('sala_sglang.plugin')",
    ]
    for way in ways:
        graph = _graph_of({"sala_sglang": "", "sala_sglang.plugin": "",
                           "sala_sglang.attention": "", "sala_sglang.attention.x": way},
                          tmp_path / str(ways.index(way)))
        assert PLUGIN in graph["sala_sglang.attention.x"], way


def test_the_checks_catch_the_old_shape(tmp_path: Path) -> None:
    # Before the restructure: the backend imported the plugin (which imports the backend in a
    # function), and benchmarking imported cli, which imported benchmarking in a function.
    graph = _graph_of({
        "sala_sglang": "",
        "sala_sglang.plugin": "def create_backend():\n"
                              "    from sala_sglang.attention.sparse_backend import B\n",
        "sala_sglang.attention": "",
        "sala_sglang.attention.sparse_backend": "from sala_sglang.plugin import dense_as_sparse\n",
        "sala_sglang.cli": "def bench():\n    from sala_sglang.benchmarking import bench\n",
        "sala_sglang.benchmarking": "from sala_sglang.cli import RECOMMENDED_SERVE_FLAGS\n",
    }, tmp_path)
    assert PLUGIN in graph["sala_sglang.attention.sparse_backend"]
    assert find_cycle(graph) == [
        "sala_sglang.attention.sparse_backend", PLUGIN, "sala_sglang.attention.sparse_backend"]
    del graph["sala_sglang.attention.sparse_backend"]
    assert find_cycle(graph) == [
        "sala_sglang.benchmarking", "sala_sglang.cli", "sala_sglang.benchmarking"]


def test_a_package_importing_its_own_submodules_is_no_cycle(tmp_path: Path) -> None:
    # reference/__init__ imports reference.model, which imports reference.norms: Python runs the
    # package's __init__ first, so the submodules see it already loading; that is not a circle.
    graph = _graph_of({
        "sala_sglang": "",
        "sala_sglang.reference": "from sala_sglang.reference.model import M\n",
        "sala_sglang.reference.model": "from sala_sglang.reference.norms import n\n",
        "sala_sglang.reference.norms": "",
    }, tmp_path)
    assert find_cycle(graph) is None
