"""A sentence-by-sentence audit of language.md sections 2, 3, 7, 8, 10 and 11, black-box.

Each test cites the sentence it holds riprap to, and covers what the other contract tests
(test_cli_contract.py, test_language_contract.py, test_mesh_contract.py) do not.
"""

from __future__ import annotations

from pathlib import Path

from contract_helpers import parse_diags, riprap, write


def test_s8_s11_compile_target_envoy_warnings_read_like_diagnostics(checkout_copy: Path, tmp_path: Path) -> None:
    """s8: "A diagnostic reads `PATH:LINE:COL: ...`, then the source line and a caret under the
    column"; s11: where Envoy differs, the warning names the statement. `compile --target envoy`
    prints its `warning[envoy]` notes that way too, at the statement's own line."""
    res = riprap("compile", checkout_copy, "--target", "envoy", "-o", tmp_path / "out")
    assert res.rc == 0, res.err
    notes = [d for d in parse_diags(res.err) if d.code == "envoy"]
    assert notes, res.err
    lines = checkout_copy.read_text(encoding="utf-8").splitlines()
    for d in notes:
        assert d.sev == "warning"
        assert d.body[1].endswith(lines[d.line - 1]), d
        assert d.body[2].index("^") - d.body[2].index("|") - 2 == d.col - 1, d
    breaker = next(d for d in notes if d.msg.startswith("service inventory: breaker:"))
    assert lines[breaker.line - 1].strip().startswith("breaker failure-rate"), breaker


def test_s8_explain_prints_each_statement_on_its_own_line(checkout_copy: Path) -> None:
    """s8: `explain` gives "the resolved policy of each service in plain words". The contract's
    example answers from a file that ends in a newline; that newline must not split the
    fallback line (a `; 2. ...` line of its own, under no heading)."""
    (checkout_copy.parent / "fallbacks" / "recommendations.json").write_text('{"items": []}\n', encoding="utf-8")
    res = riprap("explain", checkout_copy, "recommendations")
    assert res.rc == 0, res.err
    for line in res.out.splitlines():
        assert not line or line.startswith(("#", "app ", "service ", " ")), res.out
    fallback = next(line for line in res.out.splitlines() if line.strip().startswith("fallback:"))
    assert '{"items": []}\\n' in fallback, fallback


def test_s8_fmt_takes_a_directory_like_check(tmp_path: Path) -> None:
    """s8: `riprap fmt FILE... [--check]` rewrites files in canonical form; like `check PATH...`
    (and ruff or black) a directory means its `*.riprap` files (a choice where s8 is silent)."""
    messy = "service a {\n  timeout   2s\n      endpoint http://127.0.0.1:9001\n}\n"
    one = write(tmp_path / "policies", "one.riprap", messy)
    two = write(tmp_path / "policies" / "nested", "two.riprap", messy)
    other = write(tmp_path / "policies", "notes.txt", messy)
    check = riprap("fmt", "--check", tmp_path / "policies")
    assert check.rc == 1 and str(one) in check.err and str(two) in check.err, check.err
    assert riprap("fmt", tmp_path / "policies").rc == 0
    assert one.read_text(encoding="utf-8") == two.read_text(encoding="utf-8") != messy
    assert other.read_text(encoding="utf-8") == messy
    assert riprap("fmt", "--check", tmp_path / "policies").rc == 0
    (tmp_path / "empty").mkdir()
    assert riprap("fmt", tmp_path / "empty").rc == 2


def test_s8_json_diagnostics_carry_path_line_and_column(tmp_path: Path) -> None:
    """s8: `--format json` prints the diagnostics of `PATH:LINE:COL: error[CODE]: message`;
    each object has them under the text form's names (`path`, `line`, `column`) as well as
    `file` and `col`, so a mypy-style reader finds them too."""
    bad = write(tmp_path, "bad.riprap", "service a {\n    timeout 2s\n    endpoint http://127.0.0.1:9001\n    use nope\n}\n")
    res = riprap("check", "--format", "json", bad)
    assert res.rc == 1
    [d] = [d for d in res.json() if d["severity"] == "error"]
    assert (d["path"], d["line"], d["column"]) == (d["file"], 4, d["col"]) == (str(bad), 4, 9)
    assert d["code"].startswith("RP") and "nope" in d["message"]


def test_s8_a_compiled_plan_json_is_accepted_wherever_run_accepts_it(tmp_path: Path) -> None:
    """s8: "FILE may also be a compiled plan `.json`" (run); s7: the plan "is validated against
    [its schema] on every compile and every load". `check`, `compile` (both targets),
    `explain` and `graph` load such a file as a plan, not as policy text, and report a plan
    that breaks the schema as one located error (exit 1)."""
    src = write(tmp_path, "shop.riprap", "service pay {\n    timeout 2s\n    endpoint http://127.0.0.1:9001\n"
                "    retry 2 per-try 500ms budget 20%\n}\n")
    plan = tmp_path / "shop.json"
    assert riprap("compile", src, "-o", plan).rc == 0
    check = riprap("check", plan)
    assert check.rc == 0 and not parse_diags(check.out), check.out
    assert riprap("compile", plan).json()["services"]["pay"]["timeout"] == 2
    assert "pay" in riprap("explain", plan).out
    assert "pay" in riprap("graph", plan).out
    envoy = riprap("compile", plan, "--target", "envoy", "-o", tmp_path / "envoy")
    assert envoy.rc == 0 and (tmp_path / "envoy" / "envoy.yaml").is_file(), envoy.err
    engine = riprap("check", "--engine", "envoy", plan)
    assert engine.rc == 0 and any(d.sev == "warning" for d in parse_diags(engine.out)), engine.out
    broken = tmp_path / "broken.json"
    broken.write_text(plan.read_text(encoding="utf-8").replace('"timeout": 2.0', '"timeout": "2s"', 1), encoding="utf-8")
    bad = riprap("check", broken)
    [d] = parse_diags(bad.out)
    assert bad.rc == 1 and d.sev == "error" and "/services/pay/timeout" in d.msg, bad.out
    assert riprap("compile", broken).rc == 1


def test_s10_amplification_of_one_hop_in_one_file(tmp_path: Path) -> None:
    """s10: retry amplification is "the product of attempts along a call path (warning above 10
    by default, `--max-amplification N`)". One file's app calling one service with `retry 20`
    is a path of 21 attempts: a warning naming the path, and its steady-state figure said once."""
    f = write(tmp_path, "amp.riprap", "service a {\n    timeout 10s\n    endpoint http://127.0.0.1:9001\n"
              "    retry 20 per-try 100ms budget 20%\n}\n")
    res = riprap("check", f)
    [d] = [d for d in parse_diags(res.out) if "amplification" in d.msg]
    assert res.rc == 0 and d.sev == "warning" and "amp → a" in d.msg and "21" in d.msg, res.out
    assert "≈" not in d.msg, d.msg  # `about 1.2 ≈ 1.2` said nothing twice
    assert not [d for d in parse_diags(riprap("check", "--max-amplification", "21", f).out) if "amplification" in d.msg]


def test_s8_a_service_line_that_does_not_parse_is_one_error_not_also_no_services(tmp_path: Path) -> None:
    """s8: "Every problem in a file is reported" — and only real ones. `service a+b {` is a bad
    name (s2: names are `[A-Za-z][A-Za-z0-9_.-]*`): one error at the `+`, not also a warning
    that the file declares no services."""
    f = write(tmp_path, "bad.riprap", "service a+b {\n    timeout 1s\n    endpoint http://127.0.0.1:9001\n}\n")
    res = riprap("check", f)
    diags = parse_diags(res.out)
    assert res.rc == 1 and [(d.sev, d.line, d.col) for d in diags] == [("error", 1, 10)], res.out


def test_s8_version_is_printed_with_exit_0() -> None:
    """s8 lists the commands; like ruff, mypy and terraform, `riprap --version` names the
    installed version on stdout and exits 0 (a choice where s8 is silent)."""
    from importlib.metadata import version

    res = riprap("--version")
    assert res.rc == 0 and res.out.strip() == f"riprap {version('riprap')}", (res.out, res.err)


def test_s8_source_line_as_written_and_caret_under_the_column_with_tabs(tmp_path: Path) -> None:
    """s8: "then the source line and a caret under the column ... Line and column are 1-based".
    A line indented with tabs is shown as written, and the caret's indent repeats those tabs:
    it is the COL-th character, and under the column however a terminal expands tabs."""
    f = write(tmp_path, "tabs.riprap", "service a {\n\ttimeout 1s\n\tendpoint http://127.0.0.1:9001\n\t\tuse critcal\n}\n")
    res = riprap("check", f)
    [d] = [d for d in parse_diags(res.out) if d.sev == "error"]
    assert (d.line, d.col) == (4, 7), res.out
    source, caret = d.body[1], d.body[2]
    assert source.endswith("| \t\tuse critcal"), repr(source)
    bar = caret.index("|") + 2
    assert caret[bar:].index("^") == d.col - 1 and caret[bar:bar + 2] == "\t\t", repr(caret)
    assert caret.expandtabs().index("^") == source.expandtabs().index("critcal"), (source, caret)


def test_s7_schema_shipped_in_the_package_is_the_one_published_in_the_docs() -> None:
    """s7: the plan "has a JSON Schema shipped in the package and published in the docs": the
    installed `dsl` package holds it and docs/ publishes the same file, a valid draft 2020-12
    schema (plans validating against it: test_language_contract.py)."""
    import json
    from importlib.resources import files

    import jsonschema

    shipped = json.loads(files("dsl").joinpath("plan.schema.json").read_text(encoding="utf-8"))
    docs = Path(__file__).resolve().parents[2] / "docs" / "plan.schema.json"
    assert json.loads(docs.read_text(encoding="utf-8")) == shipped
    jsonschema.Draft202012Validator.check_schema(shipped)


def test_s8_s11_compile_target_envoy_format_json_is_one_list(checkout_copy: Path, tmp_path: Path) -> None:
    """s8: `compile` has "exit codes as `check`", and `--format json` prints diagnostics "as a
    JSON list": with `--target envoy` the file's own warnings and the engine's `warning[envoy]`
    notes are that one list, on stderr, and the folder is still written."""
    import json

    res = riprap("compile", checkout_copy, "--target", "envoy", "-o", tmp_path / "out", "--format", "json")
    assert res.rc == 0 and res.out == "", res.err
    diags = json.loads(res.err)
    codes = {d["code"] for d in diags}
    assert "envoy" in codes and "RP301" in codes, codes
    assert all(d["severity"] == "warning" and d["line"] >= 1 for d in diags)
    assert (tmp_path / "out" / "envoy.yaml").is_file()
