"""Regression tests for bugs found by the contract tests (tests/contract) and around them:
parser recovery in multi-line JSON, one-file findings on files with errors and on shards,
`compile` failing like `check`, overflow and run time of the worst-case math, retry and
number limits, lone surrogate escapes, and the CLI's path de-duplication."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from dsl.analysis import analyse
from dsl.cli import expand_paths, main
from dsl.compiler import compile_source
from dsl.diagnostics import Diagnostic
from dsl.plan import BackoffSpec, BudgetSpec, RetrySpec, ServicePlan
from dsl.worstcase import backoff_bound, backoff_terms, backoff_total, breakdown, worst_case_time

EP = "    endpoint http://127.0.0.1:9001\n"


def _all(text: str, path: str = "t.riprap") -> list[Diagnostic]:
    """What `riprap check` reports for one file: compile diagnostics and analysis."""
    unit = compile_source(text, path)
    return list(unit.diagnostics) + analyse([unit])


def _places(diags: list[Diagnostic], code: str) -> list[tuple[int, int]]:
    return [(d.span.line, d.span.col) for d in diags if d.code == code and d.span]


# ---- 1. parser recovery after a bad multi-line inline JSON value --------------------------

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


def test_bad_multiline_json_reports_once_and_later_errors_still_show() -> None:
    diags = _all(MULTILINE_BAD_JSON)
    errors = [(d.code, d.span.line, d.span.col) for d in diags if d.is_error and d.span]
    assert errors == [("RP101", 6, 14), ("RP101", 13, 11)], diags
    assert not any("got '{'" in d.message for d in diags)


def test_bad_multiline_json_keeps_the_block_around_it() -> None:
    # the JSON's braces are not blocks: the service block still closes at line 7, and an
    # error after the JSON in the same block is found at its own place
    text = (
        "service a {\n" + EP + "    fallback status 503 json {\n        \"a\": ,\n    }\n"
        "    timeout 0s\n}\nservice b {\n    timeout 0s\n" + EP + "}\n"
    )
    diags = _all(text)
    assert _places(diags, "RP101") == [(4, 14)]
    assert _places(diags, "RP222") == [(6, 13), (9, 13)]
    assert not _places(diags, "RP104") and not _places(diags, "RP105")


def test_bad_one_line_json_then_block_close_on_the_same_line() -> None:
    text = "service a { fallback status 503 json {\"a\": ,} }\nservice b {\n    timeout 0s\n" + EP + "}\n"
    diags = _all(text)
    assert _places(diags, "RP101") == [(1, 44)]
    assert _places(diags, "RP222") == [(3, 13)]


# ---- 2. compile fails on what check fails on (a fallback cycle) ------------------------

CYCLE = (
    "service p {\n    timeout 1s\n" + EP + "    fallback service q\n}\n"
    "service q {\n    timeout 1s\n    endpoint http://127.0.0.1:9002\n    fallback service p\n}\n"
)


def test_compile_exits_1_on_a_fallback_cycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "shop.riprap"
    f.write_text(CYCLE, encoding="utf-8")
    out = tmp_path / "plan.json"
    assert main(["check", str(f)]) == 1
    capsys.readouterr()
    assert main(["compile", str(f), "-o", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists()
    assert f"{f}:1:1: error[RP404]" in captured.err


# ---- 3. one-file findings on a file that has errors ------------------------------------


def test_fallback_cycle_is_reported_alongside_another_error() -> None:
    diags = _all(CYCLE + "service w {\n    timeout 1s\n}\n")
    assert _places(diags, "RP206") == [(11, 9)]
    assert _places(diags, "RP404") == [(1, 1)]


def test_plan_warnings_are_reported_alongside_errors() -> None:
    text = (
        "service broken {\n    timeout 1s\n}\n"
        "service a {\n    timeout 20s\n" + EP + "    retry 2\n    breaker failure-rate 100% window 20\n}\n"
    )
    diags = _all(text)
    assert _places(diags, "RP206") == [(1, 9)]
    assert _places(diags, "RP302") == [(5, 5)]
    assert _places(diags, "RP303") == [(7, 5)]
    assert _places(diags, "RP405") == [(4, 1)]


def test_a_broken_service_or_policy_hides_only_its_own_findings() -> None:
    text = (
        "policy bad {\n    timeout 0s\n}\n"
        "service a {\n    use bad\n    timeout 20s\n" + EP + "}\n"  # uses the broken policy
        "service b {\n    timeout 20s\n" + EP + "    weight\n}\n"  # a syntax error inside
        "service c {\n    timeout 30s\n" + EP + "}\n"  # intact
    )
    diags = _all(text)
    assert any(d.is_error for d in diags)
    assert _places(diags, "RP302") == [(15, 5)]


def test_a_lost_block_without_defaults_may_have_been_the_defaults() -> None:
    # `defaults` with a syntax error in its header is lost; its timeout is unknown, so the
    # services' timeouts are not judged
    text = "defaults oops {\n    timeout 2s\n}\nservice a {\n" + EP + "}\n"
    diags = _all(text)
    assert any(d.is_error for d in diags)
    assert not _places(diags, "RP302")


def test_mesh_findings_still_come_from_the_files_that_compiled() -> None:
    retry = "    timeout 10s\n    retry 3 budget 10%\n"
    web = compile_source("app web\nservice mid {\n" + retry + EP + "}\n", "web.riprap")
    mid = compile_source("app mid\nservice leaf {\n" + retry + EP + "}\n", "mid.riprap")
    bad = compile_source(
        "app api\nservice z {\n    timeout 1s\n}\nservice y {\n    timeout 20s\n" + EP + "}\n", "api.riprap"
    )
    assert bad.plan is None and bad.resolved is not None and list(bad.resolved.services) == ["y"]
    # a broken file's diagnostics say why it does not compile (what a failed reload shows);
    # the warnings on its intact services come with the analysis
    assert not any(d.severity == "warning" for d in bad.diagnostics)
    assert _places(list(bad.findings), "RP302") == [(6, 5)]
    diags = analyse([web, mid, bad])
    assert _places(diags, "RP302") == [(6, 5)]
    assert [(d.span.file, d.span.line) for d in diags if d.code == "RP401" and d.span] == [("mid.riprap", 2)]


# ---- 4. single-file warnings see shard-level policies ----------------------------------


def _sharded(service_lines: str, shard_lines: str, shards: int = 1) -> str:
    body = "".join(
        f"    shard s{i} {{\n        endpoint http://127.0.0.1:90{i:02d}\n{shard_lines}    }}\n"
        for i in range(shards)
    )
    return "service s {\n" + service_lines + "    shard by header K\n" + body + "}\n"


def test_shard_retry_without_budget_is_warned_at_the_shard_line() -> None:
    diags = _all(_sharded("    timeout 2s\n", "        retry 2 per-try 300ms backoff 100ms\n"))
    assert _places(diags, "RP303") == [(6, 9)]
    assert "shard 's/s0'" in next(d.message for d in diags if d.code == "RP303")


def test_shard_timeout_not_below_the_default_is_warned_at_the_shard_line() -> None:
    diags = _all(_sharded("    timeout 2s\n", "        timeout 30s\n"))
    assert _places(diags, "RP302") == [(6, 9)]


def test_shard_timeout_too_short_for_inherited_retries_is_located_at_the_shard() -> None:
    service = "    timeout 2s\n    retry 2 per-try 300ms budget 10%\n"
    diags = _all(_sharded(service, "        timeout 500ms\n"))
    assert _places(diags, "RP301") == [(7, 9)]


def test_inherited_findings_are_reported_once_for_the_service() -> None:
    diags = _all(_sharded("    timeout 20s\n    retry 2\n", "", shards=3))
    assert _places(diags, "RP302") == [(2, 5)]
    assert _places(diags, "RP303") == [(3, 5)]


# ---- 5/6. worst-case math: no overflow, no loop over N; retry limit ----------------------


def test_backoff_bound_saturates_without_overflow() -> None:
    exp = BackoffSpec("exponential", 0.01, 1.0)
    dec = BackoffSpec("exponential", 0.01, 1.0, "decorrelated")
    for n in (1100, 10**6, 10**12):
        assert backoff_bound(exp, n) == 1.0
        assert backoff_bound(dec, n) == 1.0
    assert backoff_bound(BackoffSpec("exponential", 1e-6, 1e300), 10**12) == 1e300


@pytest.mark.parametrize(
    "spec",
    [
        BackoffSpec("exponential", 0.1, 1.0),
        BackoffSpec("exponential", 0.25, 1.0),
        BackoffSpec("exponential", 0.1, 1.0, "decorrelated"),
        BackoffSpec("constant", 0.2, 0.2),
        BackoffSpec("exponential", 0.5, 0.5),
    ],
)
def test_backoff_total_matches_the_sum_of_the_bounds(spec: BackoffSpec) -> None:
    for n in range(0, 40):
        expected = sum(backoff_bound(spec, k) for k in range(1, n + 1))
        assert backoff_total(spec, n) == pytest.approx(expected, abs=1e-12)


def test_worst_case_math_is_fast_for_any_retry_count() -> None:
    retry = RetrySpec(
        retries=10**12,
        on=("503",),
        backoff=BackoffSpec("exponential", 0.01, 1.0, "decorrelated"),
        per_try_timeout=0.3,
        budget=BudgetSpec(0.2, 10.0),
        methods=("GET",),
    )
    svc = ServicePlan(name="a", timeout=1.0, retry=retry)
    started = time.perf_counter()
    b = breakdown(svc)
    assert worst_case_time(svc) == 1.0
    assert time.perf_counter() - started < 0.5
    terms, more = backoff_terms(retry.backoff, retry.retries)
    assert len(terms) < 10 and more == 10**12 - len(terms)
    assert b.backoffs_more > 0 and f"{b.backoffs_more} × 1s" in b.formula()


def test_retry_count_is_capped_at_100() -> None:
    ok = _all("service a {\n    timeout 1s\n" + EP + "    retry 100 budget 20%\n}\n")
    assert not any(d.is_error for d in ok)
    for n in ("101", "1100", "1000000000000"):
        started = time.perf_counter()
        diags = _all("service a {\n    timeout 1s\n" + EP + f"    retry {n} backoff 10ms..1s budget 20%\n}}\n")
        assert time.perf_counter() - started < 1.0
        assert _places(diags, "RP227") == [(4, 11)]
        assert [d.code for d in diags if d.is_error] == ["RP227"]


def test_cli_check_and_compile_of_huge_retries_are_errors_not_crashes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "edge.riprap"
    f.write_text("service a {\n    timeout 1s\n" + EP + "    retry 700 backoff 10ms..1s jitter decorrelated\n}\n")
    assert main(["check", str(f)]) == 1
    assert main(["compile", str(f)]) == 1
    assert "internal error" not in capsys.readouterr().err


# ---- 7. lone surrogate escapes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "col"),
    [
        ('    fallback status 503 text "\\ud800 lone"', 30),
        ('    fallback status 503 json {"k": "\\udfff"}', 36),
        ('    fallback status 503 json {"\\ud800": 1}', 31),
        ('    fallback status 503 json ["ok", ["\\udc00"]]', 38),
    ],
)
def test_lone_surrogate_is_an_error_at_the_string(line: str, col: int) -> None:
    diags = _all("service a {\n" + EP + line + "\n}\n")
    assert _places(diags, "RP109") == [(3, col)]
    assert "surrogate" in next(d.message for d in diags if d.code == "RP109")


def test_invalid_escape_in_inline_json_is_an_error() -> None:
    diags = _all("service a {\n" + EP + '    fallback status 503 json {"k": "\\q"}\n}\n')
    assert _places(diags, "RP109") == [(3, 36)]


def test_surrogate_pair_is_fine_and_compiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "a.riprap"
    f.write_text(
        "service a {\n    timeout 1s\n" + EP + '    fallback status 503 text "\\ud83d\\ude00"\n}\n', encoding="utf-8"
    )
    assert main(["compile", str(f)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["services"]["a"]["fallbacks"][0]["body"] == "\U0001f600"


def test_lone_surrogate_check_and_compile_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "a.riprap"
    f.write_text("service a {\n    timeout 1s\n" + EP + '    fallback status 503 text "\\ud800 x"\n}\n')
    assert main(["check", str(f)]) == 1
    assert main(["compile", str(f)]) == 1
    assert "internal error" not in capsys.readouterr().err


# ---- 8. numbers too large ------------------------------------------------------------------

NINES = "9" * 400


@pytest.mark.parametrize(
    ("line", "col"),
    [
        (f"    timeout {NINES}h", 13),
        (f"    limit {NINES}/s", 11),
        (f"    concurrency {NINES}", 17),
        ("    retry 2 per-try 9000h budget 10%", 21),
        ("    limit 2000000000/s", 11),
        (f"    retry {'9' * 5000}", 11),
    ],
)
def test_number_too_large_is_an_error_at_the_number(line: str, col: int) -> None:
    diags = _all("service a {\n" + EP + line + "\n}\n")
    assert _places(diags, "RP227") == [(3, col)]
    assert not any(d.code == "RP299" for d in diags)
    assert all(d.span and d.span.line == 3 for d in diags if d.is_error)


def test_large_but_sane_numbers_are_fine() -> None:
    diags = _all("service a {\n    timeout 8760h\n" + EP + "    limit 1000000000/s\n    concurrency 100000\n}\n")
    assert not any(d.is_error for d in diags), diags


# ---- minor: path de-duplication, budget 0% ---------------------------------------------


def test_expand_paths_dedupes_by_resolved_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.riprap").write_text("service a {\n" + EP + "}\n")
    monkeypatch.chdir(tmp_path)
    files, problems = expand_paths(["a.riprap", "./a.riprap", str(tmp_path / "a.riprap"), "."])
    assert files == ["a.riprap"] and not problems


def test_same_file_twice_is_not_a_duplicate_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.riprap").write_text("service a {\n    timeout 1s\n" + EP + "}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["check", "a.riprap", "./a.riprap"]) == 0
    assert "RP407" not in capsys.readouterr().err


def test_budget_zero_percent_is_accepted() -> None:
    unit = compile_source("service a {\n    timeout 1s\n" + EP + "    retry 2 budget 0% min 5/s\n}\n", "t.riprap")
    assert unit.plan is not None, unit.diagnostics
    retry = unit.plan.services["a"].retry
    assert retry is not None and retry.budget is not None
    assert retry.budget.ratio == 0.0 and retry.budget.min_per_second == 5.0
    assert not math.isnan(breakdown(unit.plan.services["a"]).steady_attempts)
    assert breakdown(unit.plan.services["a"]).steady_attempts == 1.0


def test_every_invalid_string_in_inline_json_is_reported() -> None:
    line = '    fallback status 503 json {"k":"\\udfff",  "\\q": [1,"\\x"], "ok": "\\u00e9"}'
    diags = _all("service a {\n" + EP + line + "\n}\n")
    assert _places(diags, "RP109") == [(3, 35), (3, 46), (3, 55)]


def test_fmt_keeps_invalid_json_strings_as_written() -> None:
    from dsl.fmt import format_source

    line = '    fallback status 503 json {"k":"\\udfff",  "\\q": [1,"\\x"], "ok": "\\u00e9"}'
    result = format_source("service a {\n" + EP + line + "\n}\n", "t.riprap")
    assert result.formatted is not None
    assert '{"k": "\\udfff", "\\q": [1, "\\x"], "ok": "é"}' in result.formatted
    again = format_source(result.formatted, "t.riprap")
    assert again.formatted == result.formatted


def test_json_missing_a_bracket_does_not_swallow_the_block_after_it() -> None:
    # the `]` is missing: the `}` on line 4 closes the value, and `defaults` still closes
    text = (
        'defaults {\n    fallback status 503 json {\n      "a": [1,\n      "b" }\n}\n'
        "service a {\n    timeout 0s\n" + EP + "}\n"
    )
    diags = _all(text)
    assert [(d.code, d.span.line, d.span.col) for d in diags if d.is_error and d.span] == [
        ("RP101", 4, 11),
        ("RP222", 7, 13),
    ]


def test_json_that_never_closes_reports_the_open_block_once() -> None:
    diags = _all("service a {\n" + EP + "    fallback status 503 json [[[\n")
    assert _places(diags, "RP104") == [(1, 11)]
