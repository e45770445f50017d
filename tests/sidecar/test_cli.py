"""`riprap run` refuses bad input with diagnostics and an exit code, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar.cli", "run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_a_file_with_errors_prints_located_diagnostics_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.riprap"
    bad.write_text("service a {\n    endpoint http://127.0.0.1:1\n    retry lots\n}\n")
    got = run(str(bad))
    assert got.returncode == 1
    assert f"{bad}:3:" in got.stderr and "error[" in got.stderr
    assert "Traceback" not in got.stderr


def test_a_missing_file_exits_2(tmp_path: Path) -> None:
    got = run(str(tmp_path / "nope.riprap"))
    assert got.returncode == 2 and "no such file" in got.stderr
    assert "Traceback" not in got.stderr


@pytest.mark.parametrize("addr", ["nonsense", "127.0.0.1:99999", "256.1.1.1:80"])
def test_a_bad_listen_address_exits_2(tmp_path: Path, addr: str) -> None:
    ok = tmp_path / "ok.riprap"
    ok.write_text("service a {\n    endpoint http://127.0.0.1:1\n}\n")
    got = run(str(ok), "--listen", addr, "--admin", "127.0.0.1:0")
    assert got.returncode == 2 and "riprap run: error:" in got.stderr
    assert "Traceback" not in got.stderr


def test_a_busy_port_exits_2(tmp_path: Path) -> None:
    ok = tmp_path / "ok.riprap"
    ok.write_text("service a {\n    endpoint http://127.0.0.1:1\n}\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        got = run(str(ok), "--listen", f"127.0.0.1:{port}", "--admin", "127.0.0.1:0")
    assert got.returncode == 2 and "cannot listen" in got.stderr


def test_usage_errors_exit_2() -> None:
    got = run("--no-such-flag")
    assert got.returncode == 2 and "usage:" in got.stderr


@pytest.mark.slow
def test_a_compiled_plan_json_runs_and_reloads(tmp_path: Path, upstreams: object,
                                               sidecar_proc: object) -> None:
    up = upstreams("json")  # type: ignore[operator]
    src = tmp_path / "p.riprap"
    src.write_text(f"service api {{\n    endpoint {up.url}\n}}\n")
    plan = tmp_path / "plan.json"
    compiled = subprocess.run([sys.executable, "-m", "dsl.cli", "compile", str(src), "-o", str(plan)],
                              cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert compiled.returncode == 0, compiled.stderr
    proc = sidecar_proc(plan, "--grace", "0").start()  # type: ignore[operator]
    try:
        assert proc.client.get("/api/x").json()["server"] == "json"
        old = proc.plan()["hash"]
        src.write_text(f"service api {{\n    endpoint {up.url}\n}}\n\nservice b {{\n"
                       f"    endpoint {up.url}\n}}\n")
        tmp = tmp_path / "plan.json.tmp"
        subprocess.run([sys.executable, "-m", "dsl.cli", "compile", str(src), "-o", str(tmp)],
                       cwd=ROOT, check=True, timeout=20)
        tmp.replace(plan)
        proc.wait_for(lambda: proc.plan()["hash"] != old, timeout=2, what="the new plan")
        assert proc.client.get("/b/x").status_code == 200
    finally:
        assert proc.stop() == 0, proc.logs()
