"""`check --engine` and `explain --engine`: what each engine runs natively, through an
extension point or approximately, from the statement table (contract section 11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsl.cli import main
from dsl.compiler import compile_source, plan_dict
from dsl.engines import differences, engine_findings
from dsl.plan import Plan
from dsl.statements import ENGINES

POLICY = """\
defaults {
    retry 2 budget 20%
}
service a {
    endpoint http://127.0.0.1:9001
    timeout 1s
    hedge at p95 min 20ms
    fallback stale 5m
}
service b {
    timeout 1s
    breaker failures 5
    shard by header X
    shard s {
        endpoint http://127.0.0.1:9003
        concurrency 4 queue 2
    }
}
service c {
    endpoint http://127.0.0.1:9004
    timeout 1s
}
"""


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "e.riprap"
    path.write_text(POLICY, encoding="utf-8")
    return path


def test_check_engine_envoy_warns_at_each_approximate_statement(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["check", "--engine", "envoy", "--format", "json", str(policy)], capsys)
    assert code == 0
    found = sorted((d["line"], d["message"].split(":")[0]) for d in json.loads(out) if d["code"] == "RP501")
    assert found == [
        (2, "service 'a'"),  # retry, from defaults: once per service that uses it
        (2, "service 'a'"),  # retry ... budget
        (2, "service 'b'"),
        (2, "service 'b'"),
        (2, "service 'c'"),
        (2, "service 'c'"),
        (7, "service 'a'"),  # hedge at
        (12, "service 'b'"),  # breaker failures
        (16, "service 'b'"),  # concurrency ... queue-timeout, in shard s
    ]
    messages = [d["message"] for d in json.loads(out) if d["code"] == "RP501"]
    assert any("`hedge at` runs approximately on the envoy engine: the Lua filter sets the hedge delay" in m for m in messages)
    assert all(d["severity"] == "warning" for d in json.loads(out) if d["code"] == "RP501")


def test_check_without_engine_or_with_python_adds_nothing(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["check", str(policy)], ["check", "--engine", "python", str(policy)]):
        code, out, _ = _run(args, capsys)
        assert code == 0 and "RP501" not in out


def test_strict_makes_engine_differences_errors(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["check", "--engine", "envoy", "--strict", str(policy)], capsys)
    assert code == 1 and "error[RP501]" in out


@pytest.mark.parametrize("command", ["check", "explain"])
def test_an_unknown_engine_is_a_usage_error_listing_the_engines(
    policy: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code, _, err = _run([command, "--engine", "nginx", str(policy)], capsys)
    assert code == 2
    assert "nginx" in err and all(engine in err for engine in ENGINES)


def test_explain_engine_envoy_sorts_statements_by_how_they_run(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["explain", str(policy), "--engine", "envoy"], capsys)
    assert code == 0
    a = out[out.index("service a") : out.index("service b")]
    assert "on the envoy engine:" in a
    assert "natively: timeout, endpoint, balance" in a
    assert "through an extension point: fallback stale (" in a
    assert "approximately: retry (" in a and "hedge at (" in a
    b = out[out.index("service b") :]
    assert "shard by header, shard (" in b and "breaker failures (" in b and "concurrency ... queue-timeout (" in b


def test_explain_engine_python_runs_everything_natively(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["explain", str(policy), "a", "--engine", "python"], capsys)
    assert code == 0
    assert "on the python engine:\n    natively: timeout, retry, retry ... budget, hedge at, fallback stale" in out
    assert "approximately" not in out and "extension" not in out
    _, plain, _ = _run(["explain", str(policy), "a"], capsys)
    assert "on the python engine" not in plain and "natively" not in plain


def test_differences_read_a_plan_loaded_from_json() -> None:
    unit = compile_source(POLICY, "e.riprap")
    assert unit.plan is not None
    plan = Plan.from_dict(json.loads(json.dumps(plan_dict(unit.plan))))
    found = {(d.service, d.use.text) for d in differences(plan, "envoy")}
    assert ("a", "hedge at") in found and ("b", "breaker failures") in found and ("b", "concurrency ... queue-timeout") in found
    assert differences(plan, "python") == []
    assert [d.code for d in engine_findings(unit, "python")] == []
