"""The CLI's exit codes, streams and the bad-input list of issue 2 (in-process via main())."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsl.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "examples/contract/checkout.riprap"
GOOD = "service a {\n    timeout 1s\n    endpoint http://127.0.0.1:9001\n}\n"


def _write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


# ---- check -------------------------------------------------------------------------


def test_check_contract_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(CONTRACT)]) == 0
    err = capsys.readouterr().out
    assert "checked 1 file: 0 errors" in err


def test_check_shared_contract_passes_when_present(capsys: pytest.CaptureFixture[str]) -> None:
    shared = Path("/work/shared/contract/checkout.riprap")
    if not shared.exists():
        pytest.skip("the shared contract is not on this machine")
    assert main(["check", str(shared)]) == 0


def test_check_reports_every_error_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(
        tmp_path,
        "bad.riprap",
        "policy critical {\n    timeout 1s\n}\nservice a {\n    use critcal\n    timout 5s\n"
        "    endpoint http://127.0.0.1:9001 weight 0\n}\n",
    )
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().out
    assert f"{path}:5:9: error[RP201]: unknown policy 'critcal'" in err
    assert "did you mean 'critical'?" in err
    assert f"{path}:6:5: error[RP102]" in err
    assert f"{path}:7:43: error[RP213]" in err
    assert "    use critcal\n" in err and "^^^^^^^" in err


def test_check_json_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "bad.riprap", "service a {\n    timeout 5x\n}\n")
    assert main(["check", str(path), "--format", "json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, list) and out
    first = out[0]
    assert first["code"] == "RP101" and first["line"] == 2 and first["col"] == 13
    assert set(first) == {"code", "severity", "file", "line", "col", "message", "hint", "path", "column"}
    assert "expected a duration such as 250ms" in first["message"]


def test_check_strict_turns_warnings_into_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "w.riprap", "service a {\n    timeout 20s\n    endpoint http://127.0.0.1:9001\n}\n")
    assert main(["check", str(path)]) == 0
    assert main(["check", "--strict", str(path)]) == 1
    assert "error[RP302]" in capsys.readouterr().out


def test_check_directory_recurses_sorted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sub").mkdir()
    _write(tmp_path, "sub/b.riprap", GOOD)
    _write(tmp_path, "a.riprap", GOOD)
    _write(tmp_path, "notes.txt", "not a policy")
    assert main(["check", str(tmp_path), "--format", "json"]) == 0
    assert "checked 2 files" in capsys.readouterr().err  # with --format json the summary stays off stdout


def test_check_calls_mesh_analysis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dsl.analysis

    seen: dict[str, object] = {}

    def fake(units: object, max_amplification: float = 10.0) -> list[object]:
        seen["units"] = units
        seen["max"] = max_amplification
        return []

    monkeypatch.setattr(dsl.analysis, "analyse", fake)
    path = _write(tmp_path, "a.riprap", GOOD)
    assert main(["check", str(path), "--max-amplification", "4"]) == 0
    assert seen["max"] == 4.0 and len(seen["units"]) == 1  # type: ignore[arg-type]


# ---- bad input (issue 2) ------------------------------------------------------------


def test_missing_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "nope.riprap")]) == 2
    assert "no such file or directory" in capsys.readouterr().out


def test_directory_without_policies_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path)]) == 2
    assert "RP003" in capsys.readouterr().out


def test_binary_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "bin.riprap", b"\x7fELF\x02\x01\x01\x00\x00\x00garbage\xff\xfe")
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().out
    assert "error[RP005]" in err and "binary" in err


def test_non_utf8_is_located_at_first_bad_byte(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "latin1.riprap", "service caf\u00e9 {\n".encode("latin-1") + b"}\n")
    assert main(["check", str(path)]) == 1
    assert f"{path}:1:12: error[RP004]" in capsys.readouterr().out


def test_ten_megabyte_file_is_refused_quickly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "big.riprap", ("# padding " + "x" * 90 + "\n") * 100_000)
    assert main(["check", str(path)]) == 1
    assert "error[RP006]" in capsys.readouterr().out


def test_ten_thousand_nested_braces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for text in ("{" * 10_000, "service a {\n" + "{\n" * 10_000, "service a {\n    fallback status 503 json " + "[" * 10_000):
        path = _write(tmp_path, "deep.riprap", text)
        assert main(["check", str(path)]) == 1
        err = capsys.readouterr().out
        assert "error[RP1" in err and "Traceback" not in err


def test_empty_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "empty.riprap", "")
    assert main(["check", str(path)]) == 1
    assert "error[RP007]" in capsys.readouterr().out


def test_unreadable_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = _write(tmp_path, "secret.riprap", GOOD)
    path.chmod(0)
    assert main(["check", str(path)]) == 2


# ---- compile ----------------------------------------------------------------------


def test_compile_prints_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", str(CONTRACT)]) == 0
    out = capsys.readouterr().out
    plan = json.loads(out)
    assert plan["version"] == 1 and plan["app"] == "checkout"
    assert plan["services"]["payments"]["timeout"] == 2.0
    assert plan["services"]["payments"]["retry"]["retries"] == 3
    assert plan["services"]["inventory"]["retry"]["retries"] == 2
    assert out.startswith('{\n  "version": 1,')


def test_compile_to_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    assert main(["compile", str(CONTRACT), "-o", str(out)]) == 0
    assert capsys.readouterr().out == ""
    assert json.loads(out.read_text())["listen"] == "127.0.0.1:7400"


def test_compile_errors_exit_1_without_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "bad.riprap", "service a {\n}\n")
    assert main(["compile", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "RP206" in captured.err


def test_compile_missing_file_exits_2(tmp_path: Path) -> None:
    assert main(["compile", str(tmp_path / "nope.riprap")]) == 2


# ---- fmt --------------------------------------------------------------------------


def test_fmt_check_and_rewrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "a.riprap", "service a {   # the one\n  timeout   1s\nendpoint http://127.0.0.1:9001\n}\n")
    assert main(["fmt", "--check", str(path)]) == 1
    assert main(["fmt", str(path)]) == 0
    assert path.read_text() == (
        "service a {  # the one\n    timeout 1s\n    endpoint http://127.0.0.1:9001\n}\n"
    )
    assert main(["fmt", "--check", str(path)]) == 0


def test_fmt_refuses_syntax_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "a.riprap", "service a {\n    timeout\n}\n")
    assert main(["fmt", str(path)]) == 1
    assert path.read_text() == "service a {\n    timeout\n}\n"
    assert "RP101" in capsys.readouterr().err


# ---- explain ----------------------------------------------------------------------


def test_explain_states_worst_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(CONTRACT)]) == 0
    out = capsys.readouterr().out
    assert "service payments" in out and "service recommendations" in out
    assert "worst-case attempts: 4" in out
    assert "worst-case time: min(2s, 4 × 600ms + 100ms + 200ms + 400ms) = 2s" in out
    assert "order (outermost first): fallback > rate limit" in out


def test_explain_one_service(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(CONTRACT), "inventory"]) == 0
    out = capsys.readouterr().out
    assert "service inventory" in out and "service payments" not in out
    assert main(["explain", str(CONTRACT), "nosuch"]) == 2


def test_explain_several_files_appends_mesh(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import dsl.analysis

    monkeypatch.setattr(dsl.analysis, "explain_mesh", lambda units: f"MESH OF {len(units)}")
    other = ROOT / "examples/edge/edge.riprap"
    assert main(["explain", str(CONTRACT), str(other)]) == 0
    out = capsys.readouterr().out
    assert "app checkout" in out and "app edge" in out and out.rstrip().endswith("MESH OF 2")


# ---- usage and delegation ------------------------------------------------------------


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("check", "compile", "fmt", "explain", "graph", "run", "demo"):
        assert command in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["check"]) == 2
    assert main(["check", str(CONTRACT), "--format", "xml"]) == 2


def test_delegated_command_missing_module(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    real = importlib.import_module

    def fake(name: str, package: str | None = None) -> object:
        if name == "sidecar.demo":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", fake)
    assert main(["demo"]) == 2
    assert "not available" in capsys.readouterr().err


def test_delegates_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    calls: list[list[str]] = []
    module = types.ModuleType("dsl.graph")
    module.main = lambda argv: calls.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dsl.graph", module)
    assert main(["graph", "a.riprap", "--format", "dot"]) == 0
    assert calls == [["a.riprap", "--format", "dot"]]


def test_console_script_runs() -> None:
    exe = shutil.which("riprap", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the console script is not installed")
    proc = subprocess.run([exe, "check", str(CONTRACT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
