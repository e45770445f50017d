"""Property: on random DAGs of policy files, the reported amplification equals brute-force path enumeration."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from mesh_fixtures import svc, unit

from dsl import mesh as m
from dsl.analysis import analyse


@st.composite
def dags(draw):
    """Apps a0..aN-1 may call any later app (so the graph is acyclic) and leaves l0..l2."""
    n = draw(st.integers(2, 7))
    calls: dict[str, list[tuple[str, int, int]]] = {}
    for i in range(n):
        targets = [f"a{j}" for j in range(i + 1, n)] + ["l0", "l1", "l2"]
        chosen = draw(st.lists(st.sampled_from(targets), unique=True, max_size=4))
        calls[f"a{i}"] = [
            (t, draw(st.integers(0, 4)), draw(st.integers(0, 2))) for t in chosen
        ]
    return calls


def brute_force(calls, start):
    """Every path from start, by recursion: target -> max product, and the sum of all products."""
    best: dict[str, int] = {}
    total = 0

    def walk(node, product):
        nonlocal total
        for target, retries, hedges in calls.get(node, ()):
            p = product * (retries + 1 + hedges)
            total += p
            best[target] = max(best.get(target, 0), p)
            walk(target, p)

    walk(start, 1)
    return best, total


def units_of(calls):
    return [
        unit(app, *(svc(t, r, hedges=h) for t, r, h in targets)) for app, targets in calls.items()
    ]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(dags(), st.integers(1, 40))
def test_worst_amplification_matches_brute_force(calls, threshold):
    units = units_of(calls)
    mesh = m.build(units)
    called = {t for targets in calls.values() for t, _, _ in targets}
    entries = [a for a in calls if a not in called]
    assert [m.node_name(e) for e in mesh.entries()] == entries

    expected_findings = set()
    for entry in entries:
        best, total = brute_force(calls, entry)
        got = m.worst_paths(mesh, m.app_id(entry))
        assert {m.node_name(n): r.amplification for n, r in got.items()} == best
        for r in got.values():  # the path shown really has the product it claims
            product = 1
            for e in r.edges:
                product *= e.attempts
            assert product == r.amplification
        assert m.total_requests(mesh, m.app_id(entry)) == total
        expected_findings |= {(entry, t, a) for t, a in best.items() if a > threshold}

    found = set()
    for d in analyse(units, max_amplification=threshold):
        assert d.code == "RP401", d.message
        match = re.search(r"= (\d+) attempts on (\S+) per (\S+) call", d.message) or re.search(
            r": (\d+) attempts on (\S+) per (\S+) call", d.message
        )
        assert match, d.message
        found.add((match[3], match[2], int(match[1])))
    assert found == expected_findings


@st.composite
def any_mesh(draw):
    """Any graph: cycles, self-named services, duplicate apps, fallback chains, sharded retries."""
    names = ["a", "b", "c", "d", "x"]
    units = []
    for i in range(draw(st.integers(1, 5))):
        app = draw(st.sampled_from(names))
        callees = draw(st.lists(st.sampled_from(names + ["leaf"]), unique=True, max_size=4))
        services = []
        for callee in callees:
            fallback = draw(st.lists(st.sampled_from(callees), unique=True, max_size=2))
            services.append(
                svc(
                    callee,
                    draw(st.one_of(st.none(), st.integers(0, 5))),
                    timeout=draw(st.sampled_from([0.1, 1.0, 3.0])),
                    per_try=draw(st.sampled_from([None, 0.05, 0.5])),
                    hedges=draw(st.integers(0, 2)),
                    backoff=draw(st.sampled_from([None, (0.01, 0.1)])),
                    budget=draw(st.sampled_from([None, 0.2])),
                    fallback=[f for f in fallback if f != callee],
                )
            )
        units.append(unit(app, *services, path=f"mesh/{i}-{app}.riprap"))
    return units


@settings(max_examples=150, deadline=None, derandomize=True)
@given(any_mesh(), st.sampled_from([1.0, 10.0]))
def test_any_mesh_gives_located_findings_and_renders(units, threshold):
    from dsl.analysis import explain_mesh
    from dsl.graph import render

    diags = analyse(units, max_amplification=threshold)
    for d in diags:
        assert d.code in {"RP401", "RP402", "RP403", "RP404", "RP405", "RP406", "RP407"}
        assert d.span is not None and d.span.file.startswith("mesh/")
        assert d.message and d.hint
    # a call cycle is reported exactly when the join has one (Kahn: peel off sinks)
    mesh = m.build(units)
    succ = {n: set(t) for n, t in m.call_successors(mesh).items()}
    left = set(mesh.nodes)
    while True:
        sinks = {n for n in left if not (succ.get(n, set()) & left)}
        if not sinks:
            break
        left -= sinks
    assert bool(left) == any(d.code == "RP403" for d in diags)
    for cyc in m.cycles(mesh.nodes, m.call_successors(mesh)):  # each named cycle is real
        assert all(b in succ[a] for a, b in zip(cyc, cyc[1:] + cyc[:1], strict=True))
    for fmt in ("mermaid", "dot", "json"):
        assert render(units, fmt)
    assert explain_mesh(units).startswith("mesh: ")
