"""The project's modules import each other in layers: no cycle between modules, none between folders.

Imports inside functions count: a deferred import still makes each module depend on the other.
"""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

SKIPPED_FOLDERS = {"tests", "build", "dist"}


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name of every Python file of the project (tests and hidden folders left out)."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] in SKIPPED_FOLDERS or any(part.startswith(".") for part in parts):
            continue
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(path: Path, package: str) -> set[str]:
    """Every module name an ``import`` or ``from ... import`` in the file refers to, relative imports resolved."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a module importing its own package's ``__init__`` not counted)."""
    modules = project_modules(root)

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = {owner(name) for name in imported_names(path, package)} - {None, module}
        graph[module] = {t for t in targets if not module.startswith(f"{t}.")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between top-level folders (modules at the top level form the folder ``(top)``)."""

    def folder(module: str) -> str:
        return module.split(".")[0] if "." in module else "(top)"

    folders: dict[str, set[str]] = {}
    for module, targets in graph.items():
        folders.setdefault(folder(module), set())
        for target in targets:
            folders.setdefault(folder(target), set())
            if folder(target) != folder(module):
                folders[folder(module)].add(folder(target))
    return folders


def test_the_project_has_no_import_cycle_between_modules() -> None:
    graph = import_graph(REPO)
    assert len(graph) > 50  # the walk found the project
    assert cycles(graph) == []


def test_the_project_has_no_import_cycle_between_folders() -> None:
    folders = folder_graph(import_graph(REPO))
    assert {"refine_pl", "datamodules", "callbacks"} <= set(folders)
    assert cycles(folders) == []
    assert "datamodules" not in folders["refine_pl"] and "callbacks" not in folders["refine_pl"]


@pytest.mark.parametrize("deferred", [False, True])
def test_a_cycle_is_found_also_through_a_deferred_import(tmp_path: Path, deferred: bool) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import thing\n")
    body = "def f():\n    from . import a\n" if deferred else "from pkg import a\n"
    (tmp_path / "pkg" / "b.py").write_text(f"thing = 1\n{body}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "c.py").write_text("import pkg.a\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
    assert cycles(folder_graph(graph)) == []
    (tmp_path / "pkg" / "d.py").write_text("def g():\n    import other.c\n")
    assert cycles(folder_graph(import_graph(tmp_path))) == [["other", "pkg"]]
