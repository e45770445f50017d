"""dsl has no import circle: every `import` counts, at the top, inside a function or under
TYPE_CHECKING (a circle hidden in a function is still a circle); and dsl imports neither
policies nor sidecar (cli.py reaches `run` and `demo` by name, through importlib)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _graph(package: str) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).glob("*.py")):
        mod = f"{package}.{path.stem}"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == package:
                    deps |= {f"{package}.{a.name}" for a in node.names}
                else:
                    deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[mod] = deps - {mod}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle among the graph's own modules, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(mod: str) -> list[str] | None:
        state[mod] = 1
        path.append(mod)
        for dep in sorted(graph.get(mod, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[mod] = 2
        return None

    for mod in graph:
        if mod not in state:
            found = visit(mod)
            if found:
                return found
    return None


def test_dsl_has_no_import_circle() -> None:
    graph = _graph("dsl")
    assert "dsl.statements" in graph and "dsl.sources" in graph and "dsl.grammar" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _top_level(path: Path) -> set[str]:
    """The modules a file imports outside any function (what importing it pulls in)."""
    deps: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            deps.add(node.module)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
    return deps


def test_dsl_imports_neither_policies_nor_sidecar() -> None:
    """Only the CLI front door reaches `sidecar`, inside the commands that need it
    (`run`, `demo`, `compile --target envoy`), so importing dsl never imports them."""
    for mod, deps in _graph("dsl").items():
        outside = {d for d in deps if d.split(".")[0] in ("policies", "sidecar")}
        if mod == "dsl.cli":
            path = ROOT / "dsl" / "cli.py"
            assert not {d for d in _top_level(path) if d.split(".")[0] in ("policies", "sidecar")}
            continue
        assert not outside, (mod, outside)


def test_reading_sources_is_apart_from_loading_plans() -> None:
    graph = _graph("dsl")
    assert not {d for d in graph["dsl.sources"] if d.startswith("dsl.")} - {"dsl.diagnostics"}
    assert "dsl.loader" not in graph["dsl.compiler"]
    assert "dsl.parser" not in graph["dsl.syntax_errors"]
