"""`riprap run` loads plans through `load_plan_source`: it must refuse what `check` refuses."""

from __future__ import annotations

import json
from pathlib import Path

from dsl.compiler import compile_file
from dsl.loader import load_plan_source

CYCLE = """\
service p {
    timeout 1s
    endpoint http://127.0.0.1:9001
    fallback service q
}
service q {
    timeout 1s
    endpoint http://127.0.0.1:9002
    fallback service p
}
"""


def test_a_policy_with_a_fallback_cycle_is_not_loaded(tmp_path: Path) -> None:
    src = tmp_path / "cycle.riprap"
    src.write_text(CYCLE)
    unit = load_plan_source(str(src))
    assert unit.plan is None
    errors = [d for d in unit.diagnostics if d.is_error]
    assert [d.code for d in errors] == ["RP404"]
    assert errors[0].span is not None and errors[0].span.line == 1


def test_a_json_plan_with_a_fallback_cycle_is_not_loaded(tmp_path: Path) -> None:
    src = tmp_path / "cycle.riprap"
    src.write_text(CYCLE)
    plan = compile_file(str(src)).plan  # the compiler alone builds it; analysis refuses it
    assert plan is not None
    out = tmp_path / "cycle.json"
    out.write_text(json.dumps(plan.to_dict()))
    unit = load_plan_source(str(out))
    assert unit.plan is None
    assert "RP404" in [d.code for d in unit.diagnostics]


def test_warnings_alone_do_not_block_a_load() -> None:
    unit = load_plan_source(str(Path(__file__).parents[2] / "examples/contract/checkout.riprap"))
    assert unit.plan is not None
    assert all(not d.is_error for d in unit.diagnostics)
