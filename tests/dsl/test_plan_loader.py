"""load_plan_source (.riprap or compiled .json), the schema, and syntax errors in words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from dsl.compiler import compile_file, compile_source, plan_dict
from dsl.loader import load_plan_source
from dsl.schema import plan_schema, validate_plan_dict

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "examples/contract/checkout.riprap"


def test_schema_is_valid_2020_12() -> None:
    schema = plan_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_the_pure_python_validator_agrees() -> None:
    unit = compile_file(str(CONTRACT))
    assert unit.plan is not None
    data = plan_dict(unit.plan)
    assert list(Draft202012Validator(plan_schema()).iter_errors(data)) == []
    data["services"]["payments"]["timeout"] = -1
    assert list(Draft202012Validator(plan_schema()).iter_errors(data))


def test_load_riprap_compiles() -> None:
    unit = load_plan_source(str(CONTRACT))
    assert unit.ok and unit.plan is not None and unit.plan.app == "checkout"


def test_load_compiled_json(tmp_path: Path) -> None:
    unit = compile_file(str(CONTRACT))
    assert unit.plan is not None
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(unit.plan.to_dict()), encoding="utf-8")
    loaded = load_plan_source(str(path))
    assert loaded.ok and loaded.plan is not None
    assert loaded.plan.digest() == unit.plan.digest()
    assert loaded.plan.source == str(path) and loaded.plan.watch == (str(path),)


@pytest.mark.parametrize(
    ("mutate", "pointer"),
    [
        (lambda d: d["services"]["payments"].__setitem__("timeout", "2s"), "/services/payments/timeout"),
        (lambda d: d.__setitem__("version", 2), "/version"),
        (lambda d: d["services"]["payments"]["retry"].__setitem__("retries", 0), "/services/payments/retry/retries"),
        (lambda d: d.__setitem__("surprise", True), "/"),
    ],
)
def test_load_invalid_plan_json(tmp_path: Path, mutate: object, pointer: str) -> None:
    unit = compile_file(str(CONTRACT))
    assert unit.plan is not None
    data = unit.plan.to_dict()
    mutate(data)  # type: ignore[operator]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    loaded = load_plan_source(str(path))
    assert loaded.plan is None
    assert loaded.diagnostics and all(d.code == "RP008" for d in loaded.diagnostics)
    first = loaded.diagnostics[0]
    assert first.span is not None and (first.span.line, first.span.col) == (1, 1)
    assert any(pointer in d.message for d in loaded.diagnostics)


def test_load_broken_json_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text('{\n  "version": 1,\n  oops\n}', encoding="utf-8")
    loaded = load_plan_source(str(path))
    assert [(d.code, d.span.line if d.span else None) for d in loaded.diagnostics] == [("RP009", 3)]
    path.write_text("[1, 2]", encoding="utf-8")
    assert [d.code for d in load_plan_source(str(path)).diagnostics] == ["RP008"]
    assert [d.code for d in load_plan_source(str(tmp_path / "none.json")).diagnostics] == ["RP001"]
    assert [d.code for d in load_plan_source(str(tmp_path / "none.riprap")).diagnostics] == ["RP001"]


def test_validate_reports_pointer() -> None:
    problems = validate_plan_dict({"version": 1, "app": "a", "listen": "x:1", "admin": "y:2", "services": {"s": {}}})
    assert problems and all(p.startswith("/") for p in problems)


# ---- syntax errors in the language's words ---------------------------------------------

EP = "    endpoint http://127.0.0.1:9001\n"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("timeout 5x", "expected a duration such as 250ms in 'timeout', got '5x'"),
        ("timeout", "expected a duration such as 250ms in 'timeout', got the end of the line"),
        ("limit 5", "expected a rate such as 100/s in 'limit', got '5'"),
        ("chaos abort 5", "expected a percentage such as 20%"),
        ("hedge at 95", "expected a percentile such as p95"),
        ("retry many", "expected a whole number such as 3 in 'retry', got 'many'"),
        ("fallback status 503 json", "expected a JSON value"),
        ("fallback status 503 text oops", 'expected a double-quoted string such as "text"'),
    ],
)
def test_syntax_errors_speak_the_language(line: str, expected: str) -> None:
    unit = compile_source("service a {\n" + EP + f"    {line}\n}}\n", "t.riprap")
    messages = [d.message for d in unit.diagnostics]
    assert any(expected in m for m in messages), messages
    for m in messages:
        assert "DURATION" not in m and "__ANON" not in m and "_NL" not in m and "Token" not in m


def test_every_syntax_error_is_reported() -> None:
    text = "service a {\n    timeout 5x\n" + EP + "    limit 5\n    retry 2 bakoff 1s\n}\nservce b {\n" + EP + "}\n"
    unit = compile_source(text, "t.riprap")
    found = [(d.code, d.span.line) for d in unit.diagnostics if d.span]
    assert found == [("RP101", 2), ("RP101", 4), ("RP101", 5), ("RP102", 7)]
    hint = [d.hint for d in unit.diagnostics if d.code == "RP102"][0]
    assert hint == "did you mean 'service'?"


def test_semantic_errors_are_reported_beside_syntax_errors() -> None:
    text = "service a {\n    timeout 5x\n    use nowhere\n}\n"
    codes = [d.code for d in compile_source(text, "t.riprap").diagnostics]
    assert codes == ["RP101", "RP201"]


def test_json_spans_lines() -> None:
    text = 'service a {\n' + EP + '    fallback status 503 json {\n        "a": [\n            1, 2\n        ],\n        "b": null\n    }\n    timeout 1s\n}\n'
    unit = compile_source(text, "t.riprap")
    assert unit.plan is not None
    assert unit.plan.services["a"].fallbacks[0].body == '{"a":[1,2],"b":null}'
    assert unit.plan.services["a"].timeout == 1.0
