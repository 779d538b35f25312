"""The import layering, read from the sources with `ast`: data/ and coevolve/core/ are the floors the
steps stand on and import nothing above them, a step package imports no other step, and no project
modules import each other in a circle.

Every import counts, those inside functions too (a lazy import is still a dependency), except those
under `if TYPE_CHECKING:`, which never run."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]

# The modules above the floors: the commands and the steps.
TOP = {f"coevolve.{name}" for name in ("cli", "__main__", "init_step", "evaluate_step", "experiment", "report")}
STEP_PACKAGES = ("coevolve.policy", "coevolve.reward", "coevolve.revision")
FLOORS = ("coevolve.data", "coevolve.core")


def project_modules() -> dict[str, Path]:
    """Module name -> file, through pyproject's package-dir (flows/ is coevolve.flows, ...)."""
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    mapped = {ROOT / folder for folder in folders.values()}
    modules = {}
    for package, folder in folders.items():
        for path in (ROOT / folder).rglob("*.py"):
            if any(parent in mapped and parent != ROOT / folder for parent in path.parents):
                continue  # a folder mapped to a package of its own
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return True
    return False


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (
                ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                if node.level
                else node.module
            )
            # `from package import module` imports the module; `from module import name` the module.
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _in(module: str, packages: tuple[str, ...]) -> str | None:
    return next((p for p in packages if module == p or module.startswith(p + ".")), None)


def upward(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        for target in targets:
            above = target in TOP or _in(target, ("coevolve.flows",))
            if _in(module, FLOORS) and (above or _in(target, STEP_PACKAGES)):
                bad.append(f"{module} -> {target}")
            elif _in(module, STEP_PACKAGES) and (
                above or _in(target, STEP_PACKAGES) not in (None, _in(module, STEP_PACKAGES))
            ):
                bad.append(f"{module} -> {target}")
    return sorted(bad)


def test_the_graph_is_read_from_the_sources():
    graph = import_graph()
    assert {
        "coevolve.cli",
        "coevolve.flows.steps",
        "coevolve.data.store",
        "coevolve.core.fastgen.backend",
    } <= graph.keys()
    assert "coevolve.core.runner" in graph["coevolve.cli"]  # lazy and top-level imports alike
    assert "coevolve.report" in graph["coevolve.cli"]
    assert "coevolve.core.fastgen.model" in graph["coevolve.core.fastgen.backend"]  # relative
    assert "coevolve.data.store" not in graph["coevolve.data.sampling"]  # TYPE_CHECKING only


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_the_checks_catch_a_circle_and_an_upward_import():
    graph = {
        "coevolve.core.a": {"coevolve.core.b"},
        "coevolve.core.b": {"coevolve.core.a", "coevolve.cli"},
        "coevolve.reward.m_step": {"coevolve.policy.e_step", "coevolve.reward.training"},
        "coevolve.cli": set(),
        "coevolve.policy.e_step": set(),
        "coevolve.reward.training": set(),
    }
    assert circles(graph) == [["coevolve.core.a", "coevolve.core.b"]]
    assert upward(graph) == ["coevolve.core.b -> coevolve.cli", "coevolve.reward.m_step -> coevolve.policy.e_step"]


def test_floors_import_nothing_above_them_and_steps_no_other_step():
    assert upward(import_graph()) == []
