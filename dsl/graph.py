"""`riprap graph PATH... [--format mermaid|dot|json]`: the mesh drawn with its policies.

Apps are boxes (entry apps filled), leaf services (upstreams outside the mesh) rounded
and dashed. Each edge is one `service` statement, labelled with its timeout, worst-case
attempts and breaker. The worst path from each entry app (most attempts, see
`dsl.mesh.worst_paths`) is drawn red and thick; edges inside a call cycle orange and dashed.

Exit codes as `check`: 0 drawn, 1 a file had errors or the mesh has an error (a cycle; the
graph is still drawn from what compiled, so a cycle can be seen), 2 usage or I/O error.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dsl import mesh as m
from dsl.analysis import analyse
from dsl.diagnostics import Diagnostic, render_all_text
from dsl.units import CompiledUnit
from dsl.worstcase import breakdown, fmt_seconds

FORMATS = ("mermaid", "dot", "json")


@dataclass(frozen=True)
class Drawing:
    """What every renderer draws: the mesh, its highlighted edges and the paths behind them."""

    mesh: m.Mesh
    entries: tuple[str, ...]
    worst: tuple[m.PathResult, ...]  # the worst path from each entry app
    hot: frozenset[tuple[str, str]]  # highlighted edges as (caller app, service name)
    cyclic: frozenset[tuple[str, str]]  # edges inside a call cycle


def layout(units: Sequence[CompiledUnit]) -> Drawing:
    """Join the units and pick the edges to highlight."""
    mesh = m.build(units)
    skip = m.cycle_edges(mesh)
    entries = mesh.entries()
    worst: list[m.PathResult] = []
    for entry in entries:
        paths = m.worst_paths(mesh, entry, skip)
        if paths:
            worst.append(max(paths.values(), key=lambda r: (r.amplification, len(r.edges))))
    hot = frozenset((e.caller, e.name) for res in worst for e in res.edges)
    return Drawing(mesh, tuple(entries), tuple(worst), hot, frozenset(skip))


def edge_label(e: m.Edge) -> str:
    """`timeout 2s (per-try 600ms) · 4 attempts · breaker 5 failures, open 30s`"""
    b = breakdown(e.service)
    timeout = f"timeout {fmt_seconds(b.timeout)}"
    if b.per_try is not None:
        timeout += f" (per-try {fmt_seconds(b.per_try)})"
    word = "attempt" if e.attempts == 1 else "attempts"
    breaker = m.describe_breaker(e.service)
    return " · ".join([timeout, f"{e.attempts} {word}", f"breaker {breaker}" if breaker else "no breaker"])


def _ids(mesh: m.Mesh) -> dict[str, str]:
    return {node: f"n{i}" for i, node in enumerate(mesh.nodes)}


def render_mermaid(d: Drawing) -> str:
    ids = _ids(d.mesh)
    out = [
        "flowchart LR",
        "  classDef entry fill:#dbeafe,stroke:#1d4ed8,stroke-width:2px",
        "  classDef app fill:#ffffff,stroke:#333333",
        "  classDef leaf fill:#f3f4f6,stroke:#6b7280,stroke-dasharray:4 3",
    ]
    for node in d.mesh.nodes:
        name = m.node_name(node)
        if node.startswith("app:"):
            cls = "entry" if node in d.entries else "app"
            out.append(f'  {ids[node]}["{name}"]:::{cls}')
        else:
            out.append(f'  {ids[node]}(["{name}"]):::leaf')
    hot: list[int] = []
    cyc: list[int] = []
    for i, e in enumerate(d.mesh.edges()):
        src = ids[m.app_id(e.caller)]
        out.append(f'  {src} -->|"{_mermaid_text(edge_label(e))}"| {ids[e.target]}')
        if (e.caller, e.name) in d.hot:
            hot.append(i)
        elif (m.app_id(e.caller), e.target) in d.cyclic:
            cyc.append(i)
    if hot:
        out.append(f"  linkStyle {','.join(map(str, hot))} stroke:#dc2626,stroke-width:3px")
    if cyc:
        out.append(
            f"  linkStyle {','.join(map(str, cyc))} stroke:#ea580c,stroke-width:2px,stroke-dasharray:5 4"
        )
    return "\n".join(out) + "\n"


def _mermaid_text(text: str) -> str:
    """Mermaid label text: quotes become entities (names cannot hold any, but be safe)."""
    return text.replace('"', "#quot;")


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_dot(d: Drawing) -> str:
    out = [
        "digraph mesh {",
        "  rankdir=LR;",
        '  node [shape=box, fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
    ]
    for node in d.mesh.nodes:
        name = _dot_quote(m.node_name(node))
        if node in d.entries:
            attrs = f'label={name}, style="filled,bold", fillcolor="#dbeafe"'
        elif node.startswith("app:"):
            attrs = f"label={name}"
        else:
            attrs = f'label={name}, shape=box, style="rounded,dashed"'
        out.append(f"  {_dot_quote(node)} [{attrs}];")
    for e in d.mesh.edges():
        src = m.app_id(e.caller)
        edge_attrs = ["label=" + _dot_quote(edge_label(e)).replace(" · ", "\\n")]
        if (e.caller, e.name) in d.hot:
            edge_attrs.append("color=red, penwidth=2")
        elif (src, e.target) in d.cyclic:
            edge_attrs.append('color=orange, style=dashed')
        out.append(f"  {_dot_quote(src)} -> {_dot_quote(e.target)} [{', '.join(edge_attrs)}];")
    out.append("}")
    return "\n".join(out) + "\n"


def to_json(d: Drawing, diagnostics: Sequence[Diagnostic] = ()) -> dict[str, Any]:
    """The graph for tools: nodes, edges with their numbers, worst paths, cycles, diagnostics."""
    mesh = d.mesh
    nodes = []
    for node in mesh.nodes:
        name = m.node_name(node)
        unit = mesh.apps.get(name) if node.startswith("app:") else None
        nodes.append(
            {
                "id": node,
                "name": name,
                "kind": "app" if unit is not None else "service",
                "entry": node in d.entries,
                "file": unit.path if unit is not None else None,
            }
        )
    edges = []
    for e in mesh.edges():
        b = breakdown(e.service)
        span = e.span
        edges.append(
            {
                "from": m.app_id(e.caller),
                "to": e.target,
                "service": e.name,
                "file": e.unit.path,
                "line": span.line if span else None,
                "timeout": b.timeout,
                "per_try": b.per_try,
                "retries": b.retries,
                "hedges": b.hedges,
                "attempts": e.attempts,
                "steady_attempts": round(e.steady, 9),
                "worst_time": round(e.time, 9),
                "breaker": m.describe_breaker(e.service),
                "label": edge_label(e),
                "highlighted": (e.caller, e.name) in d.hot,
                "in_cycle": (m.app_id(e.caller), e.target) in d.cyclic,
            }
        )
    worst = [
        {
            "entry": res.start,
            "target": res.target,
            "path": [res.start] + [e.target for e in res.edges],
            "factors": [e.attempts for e in res.edges],
            "amplification": res.amplification,
            "steady": round(res.steady, 9),
        }
        for res in d.worst
    ]
    cycles = [
        [*cyc, cyc[0]] for cyc in m.cycles(mesh.nodes, m.call_successors(mesh))
    ]
    return {
        "nodes": nodes,
        "edges": edges,
        "entries": list(d.entries),
        "worst_paths": worst,
        "cycles": cycles,
        "diagnostics": [x.to_dict() for x in diagnostics],
    }


def render(units: Sequence[CompiledUnit], fmt: str, diagnostics: Sequence[Diagnostic] = ()) -> str:
    d = layout(units)
    if fmt == "mermaid":
        return render_mermaid(d)
    if fmt == "dot":
        return render_dot(d)
    return json.dumps(to_json(d, diagnostics), indent=2) + "\n"


# ---- command line ---------------------------------------------------------------------


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="riprap graph", description="Draw the mesh of policy files with its policies.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="policy files or directories of *.riprap")
    p.add_argument("--format", choices=FORMATS, default="mermaid", help="output format (default mermaid)")
    p.add_argument("-o", "--output", metavar="PATH", help="write the graph here instead of stdout")
    return p


def policy_files(paths: Sequence[str]) -> list[Path]:
    """Files as given, directories searched recursively for *.riprap (sorted); OSError on a bad path."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*.riprap") if f.is_file())
            if not files:
                raise OSError(f"{raw}: no .riprap files in this directory")
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            raise OSError(f"{raw}: no such file or directory")
    unique: list[Path] = []
    for f in found:
        if f not in unique:
            unique.append(f)
    return unique


def compile_units(files: Sequence[Path]) -> list[CompiledUnit]:
    """Compile each file (a compiled plan `.json` is loaded), as `check` does (imported here:
    graph is a CLI front door)."""
    from dsl.cli import load_unit

    return [load_unit(str(f)) for f in files]


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        print(f"riprap graph: {exc}", file=sys.stderr)
        print(_parser().format_usage().rstrip(), file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        units = compile_units(policy_files(args.paths))
    except OSError as exc:
        print(f"riprap graph: {exc}", file=sys.stderr)
        return 2
    diags = [d for u in units for d in u.diagnostics] + analyse(units)
    errors = [d for d in diags if d.is_error]
    if errors:
        sources = {u.path: u.source for u in units}
        print(render_all_text(errors, sources), file=sys.stderr)
    text = render(units, args.format, diags)
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            print(f"riprap graph: cannot write {args.output}: {exc}", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(text)
    return 1 if errors else 0
