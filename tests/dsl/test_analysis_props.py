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
        if d.code == "RP406":  # `retry 0` with a hedge: a single-file finding, not ours here
            continue
        assert d.code == "RP401", d.message
        match = re.search(r"= (\d+) attempts on (\S+) per (\S+) call", d.message) or re.search(
            r": (\d+) attempts on (\S+) per (\S+) call", d.message
        )
        assert match, d.message
        found.add((match[3], match[2], int(match[1])))
    assert found == expected_findings
