"""The import graph of `dm_actor` has no circle, type-only imports included (issue 12, rule 3),
and no file of the actor layer is longer than ~400 lines (issue 12, rule 4).

The graph is read from the source with `ast`, never by importing: every `import` and
`from ... import` of a `dm_actor` module counts wherever it stands (top level, in a function,
under `if TYPE_CHECKING:`). `from dm_actor.x import y` is an import of `dm_actor.x.y` when that
is a module, else of `dm_actor.x`; importing a package is importing its `__init__`; relative
imports are resolved against the importing module's package. The packages a dotted import runs
on the way (`dm_actor`, `dm_actor.x` for `import dm_actor.x.y`) are not counted: a package whose
`__init__` re-exports its submodules would otherwise be a circle with each of them, whereas an
explicit `from dm_actor.x import Name` (or `from . import Name`) of a name that `__init__`
defines does count.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dm_actor"
MAX_ACTOR_FILE_LINES = 400


@dataclass(frozen=True)
class Edge:
    """One import statement of module `source` that imports module `target`."""

    source: str
    target: str
    file: str
    line: int

    def describe(self) -> str:
        return f"{self.file}:{self.line}: {self.source} -> {self.target}"


Graph = dict[str, list[Edge]]


def module_name(path: Path, root: Path) -> str:
    """`dm_actor/x/y.py` -> `dm_actor.x.y`; `dm_actor/x/__init__.py` -> `dm_actor.x`."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _known(name: str, modules: set[str]) -> str | None:
    """The longest prefix of dotted `name` that is a module of the tree, if any."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _imported(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]
) -> list[str]:
    """The tree's modules that one import statement of `module` imports."""
    if isinstance(node, ast.Import):
        found = (_known(alias.name, modules) for alias in node.names)
        return [m for m in found if m is not None]
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        if node.level - 1 > len(package):
            return []
        base_parts = package[: len(package) - (node.level - 1)]
        if node.module:
            base_parts += node.module.split(".")
        base = ".".join(base_parts)
    else:
        base = node.module or ""
    targets: list[str] = []
    for alias in node.names:
        child = f"{base}.{alias.name}"
        target = child if child in modules else _known(base, modules)
        if target is not None:
            targets.append(target)
    return targets


def import_graph(root: Path, package: str = PACKAGE) -> Graph:
    """Every module of `root/package` -> its import edges to modules of the same tree."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    modules = set(files)
    graph: Graph = {m: [] for m in files}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        rel = str(path.relative_to(root))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in dict.fromkeys(_imported(node, module, is_package, modules)):
                    graph[module].append(Edge(module, target, rel, node.lineno))
    return graph


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), those with more than one module,
    each sorted; self-imports are ignored."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, int]] = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            targets = [e.target for e in graph.get(node, []) if e.target != node]
            if i < len(targets):
                work.append((node, i + 1))
                nxt = targets[i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return sorted(components)


def circles(graph: Graph) -> list[str]:
    """One report per circle: its modules, then the import lines between them."""
    reports = []
    for component in strongly_connected(graph):
        members = set(component)
        lines = [
            e.describe()
            for m in component
            for e in graph[m]
            if e.target in members and e.target != m
        ]
        reports.append(" <-> ".join(component) + "\n    " + "\n    ".join(lines))
    return reports


# -- the cycle finder on small graphs -----------------------------------------------------------


def _graph(edges: dict[str, list[str]]) -> Graph:
    nodes = set(edges) | {t for ts in edges.values() for t in ts}
    return {
        n: [Edge(n, t, f"{n}.py", i + 1) for i, t in enumerate(edges.get(n, []))] for n in nodes
    }


def test_a_circle_is_found_with_its_import_lines() -> None:
    graph = _graph({"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "e": ["a"]})
    assert strongly_connected(graph) == [["a", "b", "c"]]
    (report,) = circles(graph)
    assert report.startswith("a <-> b <-> c")
    assert "a.py:1: a -> b" in report
    assert "c.py:1: c -> a" in report
    assert "c -> d" not in report


def test_two_circles_are_found_apart() -> None:
    graph = _graph({"a": ["b"], "b": ["a", "c"], "c": ["d"], "d": ["c"]})
    assert strongly_connected(graph) == [["a", "b"], ["c", "d"]]


def test_a_dag_passes() -> None:
    graph = _graph({"a": ["b", "c"], "b": ["c", "d"], "c": ["d"], "d": []})
    assert strongly_connected(graph) == []


def test_a_self_import_is_ignored() -> None:
    graph = _graph({"a": ["a", "b"], "b": ["b"]})
    assert strongly_connected(graph) == []


def test_a_long_chain_does_not_recurse() -> None:
    n = 5000
    graph = _graph({f"m{i}": [f"m{i + 1}"] for i in range(n)} | {f"m{n}": ["m0"]})
    assert len(strongly_connected(graph)) == 1


# -- resolving imports on a small tree ----------------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_type_only_function_level_and_relative_imports_count(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from pkg.b import B\n",
            "pkg/b.py": "def f():\n    from . import a\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "from ..a import thing\nimport pkg.sub.d as d\n",
            "pkg/sub/d.py": "from .. import b\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert {e.target for e in graph["pkg.a"]} == {"pkg.b"}
    assert {e.target for e in graph["pkg.b"]} == {"pkg.a"}
    assert {e.target for e in graph["pkg.sub.c"]} == {"pkg.a", "pkg.sub.d"}
    assert {e.target for e in graph["pkg.sub.d"]} == {"pkg.b"}
    assert strongly_connected(graph) == [["pkg.a", "pkg.b"]]
    (report,) = circles(graph)
    assert "pkg/a.py:3: pkg.a -> pkg.b" in report
    assert "pkg/b.py:2: pkg.b -> pkg.a" in report


def test_a_submodule_importing_its_package_init_that_imports_it_back_counts(
    tmp_path: Path,
) -> None:
    _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/x/__init__.py": "from pkg.x.y import Y\n",
            "pkg/x/y.py": "from pkg.x import HELPER\n",
            "pkg/x/z.py": "from pkg.x import y\n",  # the module y, not the package
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert {e.target for e in graph["pkg.x.z"]} == {"pkg.x.y"}
    assert strongly_connected(graph) == [["pkg.x", "pkg.x.y"]]


# -- the real tree ------------------------------------------------------------------------------


def test_the_graph_of_dm_actor_is_read() -> None:
    graph = import_graph(ROOT)
    assert "dm_actor.actors.supervisor" in graph
    assert sum(len(edges) for edges in graph.values()) > 100


def test_no_import_circle_among_dm_actor_modules() -> None:
    found = circles(import_graph(ROOT))
    assert not found, "import circles:\n" + "\n".join(found)


def test_no_actor_file_is_over_400_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in sorted((ROOT / PACKAGE / "actors").rglob("*.py"))
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_ACTOR_FILE_LINES
    }
    assert not long, f"over {MAX_ACTOR_FILE_LINES} lines: {long}"
