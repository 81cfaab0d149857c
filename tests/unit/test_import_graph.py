"""The import graph of `app/` has no cycle, and a few layering rules hold (read from the source with `ast`).

Every `import`/`from ... import` of an `app.*` module counts, wherever it sits (module level, inside a
function, under TYPE_CHECKING): a lazy import that closes a cycle is still a cycle a reader must untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"  # tests/unit/ -> the repository


def module_name(path: Path) -> str:
    parts = list(path.relative_to(APP.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The app modules `path` imports (a `from pkg import name` of a submodule counts as that submodule)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name.startswith("app"):
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in APP.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        # a module importing its own package's __init__ (implicitly, as every submodule does) is no edge
        graph[name] = {m for m in imports_of(path, modules) if m != name and not name.startswith(m + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_app_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 40  # the walk really saw the package
    assert "app.engines.base" in graph["app.engines.hf.engine"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_layering() -> None:
    graph = import_graph()
    # the engine protocol depends on nothing else of the kit
    assert graph["app.engines.base"] == set()
    # plugin CLIs take fail/setup_logging from app.console, never from app.cli (which imports them)
    for name, deps in graph.items():
        if name != "app.__main__":
            assert "app.cli" not in deps, f"{name} imports app.cli"
    # configs and the vLLM engine need the spec, not the selection logic
    for name in ("app.engines.vllm.engine", "app.models.config", "app.engines.hf.engine"):
        assert "app.engines.select" not in graph[name], name
    # nothing in the core imports the Ray wiring
    for name in ("app.api.routes", "app.api.openai", "app.engines.select", "app.standalone"):
        assert not {d for d in graph[name] if d.startswith("app.ray_serve")}, name
