"""The mesh: several compiled policy files joined into one call graph, and the path math on it.

Join rule (contract section 10): a service whose name is *another* file's `app` is that
app, and that file's services are its dependencies. Endpoint URLs play no part. A service
that names no other file's app is a leaf (an upstream riprap does not see into); leaves
with the same name in several files are one node, since names are how a mesh is known.
A service named like its own file's app is a leaf too: the rule only joins other files.

Node ids are `app:NAME` and `svc:NAME`, so an app and a leaf may share a name.

Entry apps are apps that no other file calls. Amplification and fan-out are computed by
dynamic programming over the graph with the edges inside call cycles left out (cycles are
reported as errors on their own), so the work is linear in the edges per entry app.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from dsl.diagnostics import Span
from dsl.plan import BreakerSpec, ServicePlan
from dsl.units import CompiledUnit
from dsl.worstcase import attempts, breakdown, fmt_seconds, steady_attempts, worst_case_time


def app_id(name: str) -> str:
    return f"app:{name}"


def svc_id(name: str) -> str:
    return f"svc:{name}"


def node_name(node: str) -> str:
    """The name part of a node id."""
    return node.split(":", 1)[1]


@dataclass(frozen=True)
class Edge:
    """One `service` statement of one app: a call from `caller` (an app name) to `target` (a node id)."""

    caller: str
    target: str
    service: ServicePlan
    unit: CompiledUnit
    attempts: int  # worstcase.attempts
    steady: float  # worstcase.steady_attempts: attempts with the retry budget in force
    time: float  # worstcase.worst_case_time of this call
    limit: float  # how long the caller waits for one try: per-try, or the whole timeout
    limit_kind: str  # "timeout" or "per-try"

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def span(self) -> Span | None:
        return self.unit.service_spans.get(self.service.name) or self.unit.app_span


@dataclass
class Mesh:
    """The joined graph. `out` maps an app node to its edges in declaration order."""

    apps: dict[str, CompiledUnit] = field(default_factory=dict)  # app name -> its file
    out: dict[str, list[Edge]] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)  # every node id, apps first in file order
    duplicates: list[tuple[CompiledUnit, CompiledUnit]] = field(default_factory=list)

    def edges(self) -> Iterable[Edge]:
        for edges in self.out.values():
            yield from edges

    def callers(self) -> dict[str, list[Edge]]:
        """Incoming edges per node id."""
        inc: dict[str, list[Edge]] = {n: [] for n in self.nodes}
        for e in self.edges():
            inc[e.target].append(e)
        return inc

    def entries(self) -> list[str]:
        """App node ids that no other file calls, in file order."""
        called = {e.target for e in self.edges() if node_name(e.target) != e.caller}
        return [app_id(a) for a in self.apps if app_id(a) not in called]


def _limit(svc: ServicePlan) -> tuple[float, str]:
    """The time a caller waits for one try of `svc` (worst shard)."""
    b = breakdown(svc)
    if b.per_try is not None and b.per_try < b.timeout:
        return b.per_try, "per-try"
    return b.timeout, "timeout"


def build(units: Sequence[CompiledUnit]) -> Mesh:
    """Join the units that compiled (plan not None). The first file to claim an app name keeps it."""
    mesh = Mesh()
    ok = [u for u in units if u.plan is not None]
    for u in ok:
        assert u.plan is not None
        first = mesh.apps.get(u.plan.app)
        if first is None:
            mesh.apps[u.plan.app] = u
        else:
            mesh.duplicates.append((first, u))
    seen: set[str] = set()
    for name in mesh.apps:
        mesh.nodes.append(app_id(name))
        seen.add(app_id(name))
    for name, u in mesh.apps.items():
        assert u.plan is not None
        edges: list[Edge] = []
        for svc in u.plan.services.values():
            target = app_id(svc.name) if svc.name in mesh.apps and svc.name != name else svc_id(svc.name)
            if target not in seen:
                seen.add(target)
                mesh.nodes.append(target)
            limit, kind = _limit(svc)
            edges.append(
                Edge(
                    caller=name,
                    target=target,
                    service=svc,
                    unit=u,
                    attempts=attempts(svc),
                    steady=steady_attempts(svc),
                    time=worst_case_time(svc),
                    limit=limit,
                    limit_kind=kind,
                )
            )
        mesh.out[app_id(name)] = edges
    return mesh


# ---- cycles ---------------------------------------------------------------------------


def strongly_connected(nodes: Sequence[str], succ: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's SCCs, iteratively (no recursion limit on long chains), in discovery order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack.add(v)
            nexts = succ.get(v, [])
            if i < len(nexts):
                work.append((v, i + 1))
                w = nexts[i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                comp: list[str] = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(comp)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return out


def cycles(nodes: Sequence[str], succ: dict[str, list[str]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component that has one.

    Each cycle starts at its component's smallest node and is the shortest way back to it,
    listed without repeating the start: ["a", "b"] means a → b → a.
    """
    found: list[list[str]] = []
    for comp in strongly_connected(nodes, succ):
        members = set(comp)
        start = min(comp)
        if len(comp) == 1 and start not in succ.get(start, []):
            continue
        # BFS inside the component from start back to start.
        prev: dict[str, str] = {}
        frontier = [start]
        end: str | None = None
        while frontier and end is None:
            nxt: list[str] = []
            for v in frontier:
                for w in succ.get(v, []):
                    if w == start:
                        end = v
                        break
                    if w in members and w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        assert end is not None
        path = [end]
        while path[-1] != start:
            path.append(prev[path[-1]])
        found.append(path[::-1])
    return found


def call_successors(mesh: Mesh) -> dict[str, list[str]]:
    return {n: [e.target for e in edges] for n, edges in mesh.out.items()}


def cycle_edges(mesh: Mesh) -> set[tuple[str, str]]:
    """(caller node, target node) pairs inside a call cycle: left out of the path math."""
    succ = call_successors(mesh)
    comp_of: dict[str, int] = {}
    for i, comp in enumerate(strongly_connected(mesh.nodes, succ)):
        for n in comp:
            comp_of[n] = i
    return {
        (src, dst)
        for src, targets in succ.items()
        for dst in targets
        if comp_of.get(src) == comp_of.get(dst)
    }


# ---- paths ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PathResult:
    """The worst (most attempts) path from a start app to one node."""

    start: str  # node id
    target: str  # node id
    edges: tuple[Edge, ...]
    amplification: int  # product of attempts along the path
    steady: float  # product of budget-bounded attempts along the same path

    @property
    def names(self) -> list[str]:
        return [node_name(self.start)] + [e.service.name for e in self.edges]

    def describe(self) -> str:
        """`edge → api → ledger: 4 × 3 = 12`, or `api → ledger: 3` for one hop."""
        factors = " × ".join(str(e.attempts) for e in self.edges)
        total = f" = {self.amplification}" if len(self.edges) > 1 else ""
        return f"{' → '.join(self.names)}: {factors}{total}"


def _topological(mesh: Mesh, start: str, skip: set[tuple[str, str]]) -> list[str]:
    """Nodes reachable from start in topological order (cycle edges skipped)."""
    reach: list[str] = []
    seen = {start}
    stack = [start]
    while stack:
        v = stack.pop()
        reach.append(v)
        for e in mesh.out.get(v, ()):
            if (v, e.target) not in skip and e.target not in seen:
                seen.add(e.target)
                stack.append(e.target)
    indeg = {v: 0 for v in reach}
    for v in reach:
        for e in mesh.out.get(v, ()):
            if (v, e.target) not in skip:
                indeg[e.target] += 1
    order: list[str] = []
    ready = [start]
    while ready:
        v = ready.pop()
        order.append(v)
        for e in mesh.out.get(v, ()):
            if (v, e.target) in skip:
                continue
            indeg[e.target] -= 1
            if indeg[e.target] == 0:
                ready.append(e.target)
    return order


def worst_paths(
    mesh: Mesh, start: str, skip: set[tuple[str, str]] | None = None
) -> dict[str, PathResult]:
    """For every node reachable from `start`, the path with the largest product of attempts.

    Ties go to the path found first (edges in declaration order). `skip` defaults to the
    edges inside call cycles.
    """
    if skip is None:
        skip = cycle_edges(mesh)
    best: dict[str, tuple[int, float, tuple[Edge, ...]]] = {start: (1, 1.0, ())}
    for v in _topological(mesh, start, skip):
        amp, steady, path = best[v]
        for e in mesh.out.get(v, ()):
            if (v, e.target) in skip:
                continue
            cand = amp * e.attempts
            cur = best.get(e.target)
            if cur is None or cand > cur[0]:
                best[e.target] = (cand, steady * e.steady, path + (e,))
    return {
        n: PathResult(start, n, path, amp, steady)
        for n, (amp, steady, path) in best.items()
        if n != start
    }


def total_requests(mesh: Mesh, start: str, skip: set[tuple[str, str]] | None = None) -> int:
    """Upstream requests one call to `start` can cause in all, if every call uses every dependency.

    The sum over all paths from `start` of the product of attempts (a diamond counts both ways).
    """
    if skip is None:
        skip = cycle_edges(mesh)
    ways: dict[str, int] = {start: 1}
    total = 0
    for v in _topological(mesh, start, skip):
        w = ways.get(v, 0)
        for e in mesh.out.get(v, ()):
            if (v, e.target) in skip:
                continue
            ways[e.target] = ways.get(e.target, 0) + w * e.attempts
            total += w * e.attempts
    return total


def callee_worst(mesh: Mesh, app: str) -> tuple[float, Edge | None]:
    """The longest an app can keep working on one call for its dependencies: its slowest edge.

    An edge's time is its worst-case time plus the worst-case time of each `fallback service`
    it falls back to (taken after the call failed), following that service's own fallbacks.
    """
    best, which = 0.0, None
    for e in mesh.out.get(app_id(app), ()):
        t = e.time + fallback_time(e)
        if t > best:
            best, which = t, e
    return best, which


def fallback_time(edge: Edge) -> float:
    """Worst-case time of the `fallback service` chain after `edge`'s call failed (cycle-safe)."""
    plan = edge.unit.plan
    assert plan is not None
    total = 0.0
    seen = {edge.service.name}
    todo = list(fallback_targets(edge.service))
    while todo:
        name = todo.pop(0)
        if name in seen or name not in plan.services:
            continue
        seen.add(name)
        svc = plan.services[name]
        total += worst_case_time(svc)
        todo.extend(fallback_targets(svc))
    return total


def fallback_targets(svc: ServicePlan) -> list[str]:
    """The services a service falls back to, its own chain then each shard's, in order."""
    out: list[str] = []
    for f in list(svc.fallbacks) + [f for s in svc.shards for f in s.fallbacks]:
        if f.kind == "service" and f.service and f.service not in out:
            out.append(f.service)
    return out


def describe_breaker(svc: ServicePlan) -> str | None:
    """`5 failures, open 30s` / `50% of 20, open 10s`; per shard when shards differ; None without."""
    specs = [s.breaker for s in svc.shards] if svc.shards else [svc.breaker]
    texts = {_breaker_text(b) for b in specs if b is not None}
    if not texts:
        return None
    if len(texts) == 1 and all(b is not None for b in specs):
        return texts.pop()
    return "per shard"


def _breaker_text(b: BreakerSpec) -> str:
    if b.kind == "consecutive":
        return f"{b.failures} failures, open {fmt_seconds(b.open)}"
    rate = (b.rate or 0.0) * 100
    return f"{rate:g}% of {b.window}, open {fmt_seconds(b.open)}"
