"""The policies package's import graph, read from the source (AST), counting imports
under `if TYPE_CHECKING:` and inside functions: no circle, stages below the runtime,
no import of the sidecar."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def module_files(package: str) -> dict[str, Path]:
    base = ROOT / package
    out: dict[str, Path] = {}
    for path in sorted(base.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports, anywhere in its source."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports pkg.sub when it is a module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph(package: str) -> dict[str, set[str]]:
    files = module_files(package)
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def reaches(g: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for w in g.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_checker_finds_a_planted_circle() -> None:
    g = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert cycles(g) == [["p.a", "p.b", "p.c"]]


def test_type_checking_and_relative_imports_count(tmp_path: Path) -> None:
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from policies.runtime import X\n"
    f = tmp_path / "m.py"
    f.write_text(src)
    assert imports_of("policies.m", f, {"policies.runtime", "policies.m"}) == {"policies.runtime"}
    f.write_text("from . import runtime\nfrom .stages import balance\n")
    known = {"policies.runtime", "policies.stages", "policies.stages.balance", "policies.m"}
    assert imports_of("policies.m", f, known) == {"policies.runtime", "policies.stages.balance"}


def test_policies_has_no_import_circle() -> None:
    g = graph("policies")
    assert "policies.runtime" in g and "policies.stages.balance" in g
    assert cycles(g) == []


@pytest.mark.parametrize("module", ["policies.stage", "policies.context", "policies.hedging",
                                    "policies.fallback_chain", "policies.health_checks",
                                    "policies.timers", "policies.stages.balance",
                                    "policies.stages.retry", "policies.stages.hedge",
                                    "policies.stages.fallback"])
def test_stages_and_their_parts_never_reach_the_runtime(module: str) -> None:
    reached = reaches(graph("policies"), module)
    assert not reached & {"policies.runtime", "policies.transport", "policies.pipeline"}, reached


def test_every_stage_module_is_below_the_pipeline() -> None:
    g = graph("policies")
    stages = {m for m in g if m.startswith("policies.stages.")}
    assert stages and stages <= g["policies.pipeline"]


def test_policies_never_imports_the_sidecar() -> None:
    files = module_files("policies")
    assert "policies.runtime" in files
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level:
                assert not (node.module or "").startswith("sidecar"), name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("sidecar") for a in node.names), name
