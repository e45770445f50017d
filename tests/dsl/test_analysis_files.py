"""Mesh analysis end to end: real policy files through the compiler and `riprap check`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsl.analysis import analyse, explain_mesh
from dsl.cli import main as riprap
from dsl.compiler import compile_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mesh"
FIXTURES = Path(__file__).resolve().parent / "mesh_fixtures"


def compiled(directory: Path):
    units = [compile_file(str(p)) for p in sorted(directory.glob("*.riprap"))]
    assert all(u.plan is not None for u in units), [d for u in units for d in u.diagnostics]
    return units


def found(units, **kw):
    return [(d.code, Path(d.span.file).name, d.span.line) for d in analyse(units, **kw)]


def test_example_mesh_shows_each_finding_with_its_path():
    units = compiled(EXAMPLE)
    assert [d for u in units for d in u.diagnostics] == []  # no single-file warnings of the checker
    diags = analyse(units)
    assert [(d.code, Path(d.span.file).name, d.span.line) for d in diags] == [
        ("RP402", "api.riprap", 12),
        ("RP405", "api.riprap", 20),
        ("RP402", "edge.riprap", 16),
        ("RP406", "edge.riprap", 25),
        ("RP401", "ledger.riprap", 6),
    ]
    assert all(d.severity == "warning" for d in diags)
    by_code = {d.code: d.message for d in diags}
    assert by_code["RP401"].startswith(
        "retry amplification: edge → api → ledger → db: 3 × 3 × 3 = 27 attempts on db per edge call; "
        "with the retry budgets on this path about 1.2 × 1.1 × 1.2 ≈ 1.58 in steady state"
    )
    inversions = [d.message for d in diags if d.code == "RP402"]
    assert inversions == [
        "deadline inversion: api → ledger → db: api's per-try timeout for ledger is 800ms, but ledger "
        "can keep working on db for 1.65s (ledger's timeout 2s for db: "
        "min(2s, 3 × 500ms + 50ms + 100ms) = 1.65s)",
        "deadline inversion: edge → api → ledger: edge's timeout for api is 1s, but api can keep "
        "working on ledger for 2.7s (api's timeout 3s for ledger: "
        "min(3s, 3 × 800ms + 100ms + 200ms) = 2.7s)",
    ]


def test_riprap_check_on_the_example_mesh(capsys):
    assert riprap(["check", str(EXAMPLE)]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "warning[RP401]: retry amplification: edge → api → ledger → db: 3 × 3 × 3 = 27" in text
    assert "warning[RP402]: deadline inversion: edge → api → ledger:" in text
    assert "warning[RP405]" in text and "warning[RP406]" in text
    assert riprap(["check", str(EXAMPLE), "--strict"]) == 1
    capsys.readouterr()
    assert riprap(["check", str(EXAMPLE), "--max-amplification", "27", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "RP401" not in {d["code"] for d in listed}


def test_calm_mesh_has_no_findings():
    units = compiled(FIXTURES / "calm")
    assert [d for u in units for d in u.diagnostics] == []
    assert analyse(units) == []


def test_diamond_reports_the_worse_path():
    units = compiled(FIXTURES / "diamond")
    diags = analyse(units)
    assert [(d.code, Path(d.span.file).name, d.span.line) for d in diags] == [("RP401", "reports.riprap", 3)]
    assert diags[0].message.startswith(
        "retry amplification: gateway → reports → db: 3 × 5 = 15 attempts on db per gateway call"
    )
    # the other way round the diamond, gateway → orders → db (3 × 2 = 6), is not the worst
    # path to db, so it is never the one reported; at 15 nothing is above the threshold
    assert found(units, max_amplification=5) == [("RP401", "reports.riprap", 3)]
    assert found(units, max_amplification=15) == []


def test_call_cycle_files(capsys):
    units = compiled(FIXTURES / "cycle")
    (d,) = analyse(units)
    assert (d.code, d.severity, Path(d.span.file).name, d.span.line) == ("RP403", "error", "billing.riprap", 3)
    assert d.message.startswith("call cycle: billing → notify → orders → billing;")
    assert riprap(["check", str(FIXTURES / "cycle")]) == 1
    assert "error[RP403]: call cycle: billing → notify → orders → billing" in "".join(capsys.readouterr())


def test_fallback_cycle_file(capsys):
    (unit,) = compiled(FIXTURES / "fallback-cycle")
    (d,) = analyse([unit])
    assert (d.code, d.severity, d.span.line) == ("RP404", "error", 3)
    assert d.message.startswith("fallback cycle: primary → secondary → primary;")
    assert riprap(["check", str(FIXTURES / "fallback-cycle" / "shop.riprap")]) == 1


def test_contract_example_has_no_mesh_findings():
    contract = ROOT / "examples" / "contract" / "checkout.riprap"
    if not contract.exists():
        pytest.skip("examples/contract/checkout.riprap is not there yet")
    unit = compile_file(str(contract))
    assert unit.plan is not None
    assert analyse([unit]) == []


def test_explain_mesh_on_the_example():
    text = explain_mesh(compiled(EXAMPLE))
    assert text.splitlines()[0] == "mesh: 3 apps, 4 leaf services, entry apps: edge"
    assert (
        "  worst-case fan-out: 27 attempts on db per edge call (edge → api → ledger → db: 3 × 3 × 3 = 27)"
        in text
    )
    assert "  worst-case time for its dependencies: 2.7s (on ledger: min(3s, 3 × 800ms + 100ms + 200ms) = 2.7s)" in text
