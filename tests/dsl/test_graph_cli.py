"""`riprap graph` end to end: real files, exit codes, and graphviz's own check of the dot output."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from dsl.cli import main as riprap
from dsl.graph import main as graph

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mesh"
FIXTURES = Path(__file__).resolve().parent / "mesh_fixtures"


def test_mermaid_is_the_default(capsys):
    assert graph([str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "flowchart LR"
    assert '  n0["api"]:::app' in lines  # files in path order: api, edge, ledger
    assert '  n1["edge"]:::entry' in lines
    # edge → api → ledger → db is the worst path (27 attempts): its three links are red
    links = [line for line in lines if "-->" in line]
    red = [int(i) for i in lines[-1].removeprefix("  linkStyle ").split(" ")[0].split(",")]
    assert "stroke:#dc2626" in lines[-1]
    assert [links[i] for i in red] == [
        '  n0 -->|"timeout 3s (per-try 800ms) · 3 attempts · no breaker"| n2',
        '  n1 -->|"timeout 1s · 3 attempts · breaker 5 failures, open 10s"| n0',
        '  n2 -->|"timeout 2s (per-try 500ms) · 3 attempts · no breaker"| n5',
    ]


def test_the_cli_delegates_to_graph(capsys):
    assert riprap(["graph", str(EXAMPLE), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["worst_paths"][0]["path"] == ["app:edge", "app:api", "app:ledger", "svc:db"]
    assert data["worst_paths"][0]["amplification"] == 27
    assert {d["code"] for d in data["diagnostics"]} == {"RP401", "RP402", "RP405", "RP406"}


def test_dot_of_the_example_renders_with_graphviz(capsys, tmp_path):
    dot = shutil.which("dot")
    if dot is None:
        pytest.skip("graphviz `dot` is not installed (apt-get install graphviz); dot output not validated")
    out = tmp_path / "mesh.dot"
    assert graph([str(EXAMPLE), "--format", "dot", "-o", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert '"app:ledger" -> "svc:db" [label="timeout 2s (per-try 500ms)\\n3 attempts\\nno breaker", color=red, penwidth=2];' in text
    done = subprocess.run([dot, "-Tsvg", str(out)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "<svg" in done.stdout and done.stderr == ""


def test_a_cycle_is_drawn_and_exits_1(capsys):
    assert graph([str(FIXTURES / "cycle"), "--format", "dot"]) == 1
    out, err = capsys.readouterr()
    assert "error[RP403]: call cycle: billing → notify → orders → billing" in err
    assert '"app:billing" -> "app:notify" [label="timeout 1s\\n1 attempt\\nno breaker", color=orange, style=dashed];' in out


def test_a_file_with_errors_exits_1(tmp_path, capsys):
    bad = tmp_path / "bad.riprap"
    bad.write_text("app bad\nservice x {\n    timeout soon\n}\n", encoding="utf-8")
    assert graph([str(bad)]) == 1
    out, err = capsys.readouterr()
    assert "bad.riprap:3:" in err and "error[" in err
    assert out.startswith("flowchart LR")  # what compiled is still drawn (here: nothing)


@pytest.mark.parametrize(
    "argv",
    [[], ["--format", "svg", "x.riprap"], ["/no/such/dir"], ["--bogus", "x"]],
    ids=["no-path", "bad-format", "missing-path", "bad-option"],
)
def test_usage_and_io_errors_exit_2(argv, capsys):
    assert graph(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("riprap graph: ")


def test_directory_without_policy_files_exits_2(tmp_path, capsys):
    assert graph([str(tmp_path)]) == 2
    assert "no .riprap files" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert graph(["--help"]) == 0
    assert "--format" in capsys.readouterr().out
