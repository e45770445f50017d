"""Acceptance tests for the CLI: contract section 8 (check, compile, fmt, explain, graph).

Black-box through the `riprap` console script; `run` and `demo` are out of scope here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from contract_helpers import (
    CHECKOUT,
    CONTRACT_DIR,
    compile_plan,
    errors,
    parse_diags,
    riprap,
    group_checks,
    run_scenarios,
    ungroup,
    warnings,
    write,
)

CLEAN = """
service api {
    timeout 2s
    endpoint http://127.0.0.1:9001
    retry 1 backoff 100ms per-try 500ms budget 20%
}
"""

# a warning and nothing else: no timeout below the built-in 15s (section 10)
WARN_ONLY = """
service api {
    endpoint http://127.0.0.1:9001
}
"""

# three errors on lines 2, 4 and 6, of different kinds
THREE_ERRORS = """
service api {
    use critcal
    timeout 1s
    retry lots
    endpoint http://127.0.0.1:9001
    fallback status 700 text "x"
}
policy critical {
    timeout 1s
}
"""


SMALL_MESH = {
    "web.riprap": """
        app web
        service catalog {
            timeout 3s
            endpoint http://127.0.0.1:9801
            retry 1 backoff 50ms per-try 1s budget 20%
        }
        """,
    "catalog.riprap": """
        app catalog
        service search {
            timeout 800ms
            endpoint http://127.0.0.1:9802
        }
        """,
}

WORST_CASE = """
service a {
    timeout 5s
    endpoint http://127.0.0.1:9001
    retry 2 per-try 500ms backoff 100ms..1s budget 20%
}
service b {
    timeout 5s
    endpoint http://127.0.0.1:9001
}
"""

MULTILINE_BAD_JSON = """
service a {
    timeout 1s
    endpoint http://127.0.0.1:9001
    fallback status 503 json {
        "a": ,
        "c": 3
    }
}
service b {
    timeout 1s
    endpoint http://127.0.0.1:9002
    retry many
}
"""

SYNTAX_HEADERS = ["service a b {", "health GET"]


def _after_syntax(header: str) -> str:
    return (
        "service z {\n    timeout 1s\n    endpoint http://127.0.0.1:9001\n}\n"
        f"{header}\n    timeout 1s\n}}\n"
        "service y {\n    timeout 1s\n    endpoint http://127.0.0.1:9002\n    retry many\n}\n"
    )


def _contract_files() -> dict[str, str]:
    if not CHECKOUT.exists():
        return {}
    return {
        str(p.relative_to(CONTRACT_DIR)): p.read_text(encoding="utf-8")
        for p in CONTRACT_DIR.rglob("*")
        if p.is_file()
    }


# name -> ({file: text}, [riprap arguments]); all run once, concurrently, by the `cli` fixture
CLI = {
    "contract_check": ({}, ["check", str(CHECKOUT)]),
    "warn": ({"warn.riprap": WARN_ONLY}, ["check", "warn.riprap"]),
    "warn_strict": ({"warn.riprap": WARN_ONLY}, ["check", "--strict", "warn.riprap"]),
    "directory": (
        {"pol/good.riprap": CLEAN, "pol/broken.riprap": THREE_ERRORS, "pol/notes.txt": "not a policy file {{{\n"},
        ["check", "pol"],
    ),
    "json_errors": ({"bad.riprap": THREE_ERRORS}, ["check", "--format", "json", "bad.riprap"]),
    "json_clean": ({"clean.riprap": CLEAN}, ["check", "--format", "json", "clean.riprap"]),
    "three_errors": ({"bad.riprap": THREE_ERRORS}, ["check", "bad.riprap"]),
    **{
        f"after_syntax_{i}": ({f"r{i}.riprap": _after_syntax(h)}, ["check", f"r{i}.riprap"])
        for i, h in enumerate(SYNTAX_HEADERS)
    },
    "multiline_json": ({"j.riprap": MULTILINE_BAD_JSON}, ["check", "j.riprap"]),
    "syntax": (
        {"syn.riprap": "service api {\n    timeout 1s\n    endpoint http://127.0.0.1:9001\n    retry 2 on {\n}\n"},
        ["check", "syn.riprap"],
    ),
    "compile_clean": ({"c.riprap": CLEAN}, ["compile", "c.riprap"]),
    "compile_warn": ({"w.riprap": WARN_ONLY}, ["compile", "w.riprap"]),
    "compile_errors": ({"bad.riprap": THREE_ERRORS}, ["compile", "bad.riprap"]),
    "explain_all": (_contract_files(), ["explain", "checkout.riprap"]),
    "explain_payments": (_contract_files(), ["explain", "checkout.riprap", "payments"]),
    "explain_nope": (_contract_files(), ["explain", "checkout.riprap", "nope"]),
    "explain_wc_a": ({"wc.riprap": WORST_CASE}, ["explain", "wc.riprap", "a"]),
    "graph_mermaid": (SMALL_MESH, ["graph", "web.riprap", "catalog.riprap", "--format", "mermaid"]),
    "graph_dir": (SMALL_MESH, ["graph", ".", "--format", "dot"]),
}


# one-file `check` scenarios that look only at their own diagnostics share one run; each
# still gets a result of its own, narrowed to its file (its `rc` is the group's)
DIAG_GROUP = group_checks(
    CLI, ["three_errors", *[f"after_syntax_{i}" for i in range(len(SYNTAX_HEADERS))], "multiline_json", "syntax"], "diags"
)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    return ungroup(run_scenarios(tmp_path_factory.mktemp("cli"), CLI), DIAG_GROUP, "diags")


def _needs_contract():
    if not CHECKOUT.exists():
        pytest.skip("contract example missing")


# ---------------------------------------------------------------------------------------
# check: exit codes
# ---------------------------------------------------------------------------------------


def test_s8_check_contract_example_passes(cli):
    # brief + §8: the contract's own example checks clean (exit 0: warnings at most)
    _needs_contract()
    res = cli["contract_check"]
    assert res.rc == 0, res.text
    assert not errors(res)


def test_s8_check_exit_0_with_warnings_only_same_format(cli):
    # §8: exit 0 with warnings only; warnings read the same with warning[CODE]
    res = cli["warn"]
    assert res.rc == 0, res.text
    ws = warnings(res)
    assert ws and not errors(res), res.text
    for w in ws:
        assert w.path.endswith("warn.riprap") and w.line >= 1 and w.col >= 1
        assert any("^" in b for b in w.body)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["check", "missing.riprap"], id="missing-file"),
        pytest.param(["check"], id="no-path"),
        pytest.param(["check", "--no-such-flag", "x.riprap"], id="unknown-flag"),
        pytest.param(["compile", "missing.riprap"], id="compile-missing"),
        pytest.param(["no-such-command"], id="unknown-command"),
    ],
)
def test_s8_exit_2_on_usage_or_io_error(tmp_path, args):
    write(tmp_path, "x.riprap", CLEAN)
    res = riprap(*args, cwd=tmp_path)
    assert res.rc == 2, res.text
    assert "Traceback" not in res.text


def test_s8_check_directory_compiles_its_riprap_files(cli):
    # §8: check PATH... compiles files or directories of *.riprap
    res = cli["directory"]
    assert res.rc == 1
    paths = {Path(d.path).name for d in errors(res)}
    assert paths == {"broken.riprap"}, res.text


# ---------------------------------------------------------------------------------------
# check: --format json and --strict
# ---------------------------------------------------------------------------------------


def test_s8_format_json_is_a_list(cli):
    res = cli["json_errors"]
    assert res.rc == 1
    data = json.loads(res.out)
    assert isinstance(data, list)
    assert len(data) >= 3
    assert all(isinstance(d, dict) for d in data)


def test_s8_clean_file_exit_0_and_json_empty_list(cli):
    res = cli["json_clean"]
    assert res.rc == 0, res.text
    assert json.loads(res.out) == []
    assert not parse_diags(res.text), res.text


def test_s8_strict_makes_warnings_errors(cli):
    assert cli["warn"].rc == 0
    assert cli["warn_strict"].rc == 1


# ---------------------------------------------------------------------------------------
# diagnostics format
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_errors(cli):
    return cli["three_errors"]


def test_s8_every_problem_in_a_file_is_reported(three_errors):
    # §8: every problem in a file is reported, not just the first
    lines = {d.line for d in errors(three_errors)}
    assert {2, 4, 6} <= lines, three_errors.text


def test_s8_diagnostic_header_format_and_1_based_location(three_errors):
    # §8: PATH:LINE:COL: error[CODE]: message; 1-based; `use critcal` -> col 9 is the name
    errs = errors(three_errors)
    assert all(d.path.endswith("bad.riprap") for d in errs)
    (use,) = [d for d in errs if d.line == 2]
    assert use.col == 9
    (retry,) = [d for d in errs if d.line == 4]
    assert retry.col == 11  # `lots`


def test_s8_source_line_and_caret_under_the_column(three_errors):
    # §8: then the source line and a caret under the column
    src_lines = THREE_ERRORS.lstrip("\n").splitlines()
    found = errors(three_errors)
    assert len(found) >= 3, found
    for d in found:
        src = src_lines[d.line - 1]
        idx = next((i for i, b in enumerate(d.body) if b.endswith(src)), None)
        assert idx is not None, f"source line {src!r} not shown for {d}"
        shown = d.body[idx]
        start = len(shown) - len(src)
        caret_line = next(b for b in d.body[idx + 1 :] if "^" in b)
        assert caret_line.index("^") == start + d.col - 1, (shown, caret_line)


def test_s8_hint_did_you_mean(three_errors):
    # §8: a hint where one helps (`did you mean 'critical'?`)
    (use,) = [d for d in errors(three_errors) if d.line == 2]
    assert "critcal" in use.msg
    assert "did you mean 'critical'?" in use.full


@pytest.mark.parametrize("i", range(len(SYNTAX_HEADERS)), ids=SYNTAX_HEADERS)
def test_s8_errors_after_a_syntax_error_are_still_reported(cli, i):
    # §8: every problem in a file is reported: a broken line 5 must not hide line 11
    res = cli[f"after_syntax_{i}"]
    assert res.rc == 1
    lines = {d.line for d in errors(res)}
    assert 5 in lines and 11 in lines, res.text


def test_s8_errors_after_bad_multiline_json_are_still_reported(cli):
    # §2 inline JSON may span lines; §8 every problem in a file is reported
    res = cli["multiline_json"]
    assert res.rc == 1
    errs = errors(res)
    assert {d.line for d in errs} == {5, 12}, res.text


def test_s8_syntax_error_is_located_not_a_traceback(cli):
    res = cli["syntax"]
    assert res.rc == 1
    assert "Traceback" not in res.text
    assert any(d.line == 4 for d in errors(res)), res.text


# ---------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------


def test_s8_compile_prints_plan_json(cli):
    res = cli["compile_clean"]
    assert res.rc == 0
    plan = json.loads(res.out)
    assert plan["version"] == 1 and "api" in plan["services"]


def test_s8_compile_with_warnings_still_prints_only_json_on_stdout(cli):
    res = cli["compile_warn"]
    assert res.rc == 0
    assert json.loads(res.out)["services"]["api"]["timeout"] == pytest.approx(15.0)


def test_s8_compile_o_writes_the_plan(tmp_path):
    write(tmp_path, "c.riprap", CLEAN)
    res = riprap("compile", "c.riprap", "-o", "plan.json", cwd=tmp_path)
    assert res.rc == 0
    written = json.loads((tmp_path / "plan.json").read_text(encoding="utf-8"))
    assert written["version"] == 1 and written["services"]["api"]["timeout"] == pytest.approx(2.0)
    assert written["services"]["api"]["retry"]["retries"] == 1


def test_s8_compile_o_unwritable_is_an_io_error(tmp_path):
    write(tmp_path, "c.riprap", CLEAN)
    res = riprap("compile", "c.riprap", "-o", str(tmp_path / "no" / "such" / "dir" / "plan.json"), cwd=tmp_path)
    assert res.rc == 2, res.text
    assert "Traceback" not in res.text


def test_s8_compile_exit_1_on_error(cli):
    res = cli["compile_errors"]
    assert res.rc == 1
    assert errors(res)


# ---------------------------------------------------------------------------------------
# fmt
# ---------------------------------------------------------------------------------------

UGLY = """
# leading comment
app   shop
defaults   {
  timeout    5s
        retry 2  on  connect-failure ,502   backoff 50ms..1s
}
policy critical{
timeout 2s
}
service   payments {
   use critical
      endpoint    http://127.0.0.1:9001   weight 2
  failover http://127.0.0.1:9101
  fallback status 503 json {"error":
        "down",   "retry": true}
  chaos delay 10%   400ms
}
"""


def _plan_of(path: Path) -> dict:
    return compile_plan(path, cwd=path.parent)


def test_s8_fmt_rewrites_idempotent_and_plan_preserving(tmp_path):
    # §8: --check only reports (exit 1); fmt rewrites in canonical form; idempotent; never
    # changes the plan
    path = write(tmp_path, "ugly.riprap", UGLY)
    before = path.read_bytes()
    assert riprap("fmt", "--check", "ugly.riprap", cwd=tmp_path).rc == 1
    assert path.read_bytes() == before
    plan_before = _plan_of(path)
    res = riprap("fmt", "ugly.riprap", cwd=tmp_path)
    assert res.rc == 0, res.text
    once = path.read_bytes()
    assert once != UGLY.lstrip("\n").encode()
    assert _plan_of(path) == plan_before
    assert riprap("fmt", "--check", "ugly.riprap", cwd=tmp_path).rc == 0  # idempotent
    assert path.read_bytes() == once


def test_s8_fmt_contract_example(checkout_copy):
    # §8: fmt never changes the plan, on the contract's own example (all directives)
    before = _plan_of(checkout_copy)
    assert riprap("fmt", checkout_copy.name, cwd=checkout_copy.parent).rc == 0
    once = checkout_copy.read_bytes()
    assert _plan_of(checkout_copy) == before
    assert riprap("fmt", "--check", checkout_copy.name, cwd=checkout_copy.parent).rc == 0
    assert checkout_copy.read_bytes() == once


def test_s8_fmt_several_files(tmp_path):
    write(tmp_path, "a.riprap", UGLY)
    write(tmp_path, "b.riprap", UGLY.replace("shop", "shop2"))
    assert riprap("fmt", "--check", "a.riprap", "b.riprap", cwd=tmp_path).rc == 1
    assert riprap("fmt", "a.riprap", "b.riprap", cwd=tmp_path).rc == 0
    assert (tmp_path / "a.riprap").read_text() == (tmp_path / "b.riprap").read_text().replace("shop2", "shop")


# ---------------------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------------------


def test_s8_explain_every_service_with_worst_case(cli):
    # §8: the resolved policy of each service in plain words, worst-case attempts and time
    _needs_contract()
    res = cli["explain_all"]
    assert res.rc == 0, res.text
    for name in ("payments", "inventory", "recommendations"):
        assert name in res.out
    assert re.search(r"worst", res.out, re.I)
    assert re.search(r"attempt", res.out, re.I)


def test_s8_explain_one_service(cli):
    # payments: retry 3 -> 4 attempts; timeout 2s bounds its worst-case time
    _needs_contract()
    res = cli["explain_payments"]
    assert res.rc == 0, res.text
    assert "payments" in res.out
    # only that service: less than the whole file's explanation
    assert len(res.out) < len(cli["explain_all"].out)
    attempts_lines = [line for line in res.out.splitlines() if re.search(r"attempt", line, re.I)]
    assert any(re.search(r"\b4\b", line) for line in attempts_lines), res.out
    assert re.search(r"\b2(\.0)?\s?s\b", res.out), res.out


def test_s8_explain_worst_case_time_below_the_timeout(cli):
    # 3 attempts x 500ms per try + backoff 100ms + 200ms = 1.8s, under the 5s timeout
    res = cli["explain_wc_a"]
    assert res.rc == 0, res.text
    assert re.search(r"\b1\.8\s?s\b|\b1800\s?ms\b", res.out), res.out
    assert any(re.search(r"\b3\b", line) for line in res.out.splitlines()
               if re.search(r"attempt", line, re.I))


def test_s8_explain_unknown_service_fails(cli):
    _needs_contract()
    res = cli["explain_nope"]
    assert res.rc != 0
    assert "Traceback" not in res.text


# ---------------------------------------------------------------------------------------
# graph
# ---------------------------------------------------------------------------------------


def test_s8_graph_mermaid(cli):
    res = cli["graph_mermaid"]
    assert res.rc == 0, res.text
    # §8: the dependency graph with its policies (the 3s and 800ms timeouts appear)
    assert "3s" in res.out and "800ms" in res.out
    first = res.out.strip().splitlines()[0]
    assert first.split()[0] in {"graph", "flowchart"}
    for name in ("web", "catalog", "search"):
        assert name in res.out
    assert "-->" in res.out or "---" in res.out


def test_s8_graph_dot_on_a_directory(cli):
    # §8: graph PATH... (paths, like check: files or directories)
    res = cli["graph_dir"]
    assert res.rc == 0, res.text
    assert re.match(r"\s*(strict\s+)?digraph\b", res.out)
    assert "->" in res.out
    for name in ("web", "catalog", "search"):
        assert name in res.out
    assert res.out.rstrip().endswith("}")
