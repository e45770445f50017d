"""Every example compiles to exactly its golden plan (tests/golden/regen.py writes them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dsl.compiler import compile_file, plan_dict

_spec = importlib.util.spec_from_file_location("golden_regen", Path(__file__).with_name("regen.py"))
assert _spec is not None and _spec.loader is not None
regen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regen)
ROOT, examples, golden_path, normalise = regen.ROOT, regen.examples, regen.golden_path, regen.normalise

EXAMPLES = examples()


def test_there_are_examples() -> None:
    names = {p.parent.name for p in EXAMPLES}
    assert {"contract", "user-profiles", "edge"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_golden_plan(example: Path) -> None:
    golden = golden_path(example)
    assert golden.exists(), f"no golden plan for {example}: run tests/golden/regen.py {example}"
    unit = compile_file(str(example))
    assert unit.plan is not None, [d.message for d in unit.diagnostics]
    assert not any(d.is_error for d in unit.diagnostics)
    assert normalise(plan_dict(unit.plan)) == json.loads(golden.read_text(encoding="utf-8"))
    # the fast serializer and the plan's own agree
    assert plan_dict(unit.plan) == unit.plan.to_dict()


def test_contract_source_and_watch_are_absolute() -> None:
    unit = compile_file(str(ROOT / "examples/contract/checkout.riprap"))
    assert unit.plan is not None
    assert unit.plan.source == str(ROOT / "examples/contract/checkout.riprap")
    assert unit.plan.watch == (
        str(ROOT / "examples/contract/checkout.riprap"),
        str(ROOT / "examples/contract/fallbacks/recommendations.json"),
    )
