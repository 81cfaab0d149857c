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


def test_engine_packages_layering() -> None:
    """app/engines: the shared pieces at the top know no engine's package; each engine's package knows no other;
    constrained decoding (grammar/) is engine-neutral; only the dispatch (registry, select) names engines."""
    graph = import_graph()
    engines = {name for name in graph if name.startswith("app.engines.")}
    assert {"app.engines.hf.engine", "app.engines.vllm.engine", "app.engines.grammar.specs",
            "app.engines.skeleton", "app.engines.registry"} <= engines
    top = {n for n in engines if n.count(".") == 2} - {"app.engines.registry", "app.engines.select"}
    for name in top:
        inner = {d for d in graph[name] if d.startswith(("app.engines.hf", "app.engines.vllm"))}
        assert not inner, f"{name} (shared) imports an engine's package: {sorted(inner)}"
    for own, other in (("app.engines.hf", "app.engines.vllm"), ("app.engines.vllm", "app.engines.hf")):
        for name in (n for n in engines if n.startswith(own + ".")):
            assert not {d for d in graph[name] if d.startswith(other)}, f"{name} imports {other}"
    for name in (n for n in engines if n.startswith("app.engines.grammar.")):
        assert not {d for d in graph[name] if d.startswith(("app.engines.hf", "app.engines.vllm", "app.api"))}, name
    # every engine shares one skeleton; DeepSpeed TP runs the transformers engine's loop, never vLLM
    for name in ("app.engines.hf.engine", "app.engines.vllm.engine", "app.deepspeed.tp"):
        assert "app.engines.skeleton" in graph[name], name
    assert not {d for d in graph["app.deepspeed.tp"] if d.startswith("app.engines.vllm")}
    # the one dispatch on `engine:` and the one validated knobs type
    assert "app.engines.registry" in graph["app.engines.select"]
    assert "app.engines.registry" in graph["app.models.config"]
    for name in ("app.settings", "app.models.config", "app.deepspeed.config"):
        assert "app.knobs" in graph[name], name


def test_app_imports_neither_tests_nor_bench() -> None:
    for path in APP.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not [n for n in names if n.split(".")[0] in ("tests", "bench")], path
