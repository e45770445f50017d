"""`riprap run FILE --engine envoy` as a user runs it: a subprocess, real Envoy, real upstreams.

Start-up errors, SIGTERM drain, Envoy killed and restarted, a configuration Envoy refuses,
hot reload under load, and the app supervisor on the Envoy engine.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from sidecar.engines.envoy.process import find_envoy
from tests.acceptance.acc_kit import Sidecar, Upstream, clean_env, free_port, riprap_cmd, wait_for

pytestmark = pytest.mark.timeout(120)


def write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # as editors save


def base_policy(a: str, b: str, extra: str = "") -> str:
    return f"""\
app envoycli
service api {{
    endpoint {a}
    endpoint {b}
    retry 2 on connect-failure, 503 backoff 1ms
}}
{extra}
"""


@pytest.fixture(scope="module")
def ups() -> Iterator[tuple[Upstream, Upstream]]:
    a, b = Upstream("A"), Upstream("B")
    yield a, b
    a.close()
    b.close()


def start(path: Path, *args: str) -> Sidecar:
    port, admin = free_port(), free_port()
    return Sidecar(path, port, admin, "--listen", f"127.0.0.1:{port}", "--admin",
                   f"127.0.0.1:{admin}", "--engine", "envoy", *args).start(timeout=30)


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*riprap_cmd(), "run", *args], capture_output=True, text=True,
                          timeout=timeout, env=clean_env())


def test_unknown_engine_is_a_usage_error_listing_the_engines(tmp_path: Path) -> None:
    path = tmp_path / "p.riprap"
    path.write_text("service a {\n    endpoint http://127.0.0.1:1\n}\n", encoding="utf-8")
    res = run_cli(str(path), "--engine", "nginx")
    assert res.returncode == 2
    assert "python" in res.stderr and "envoy" in res.stderr and "nginx" in res.stderr


def test_missing_envoy_binary_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "p.riprap"
    path.write_text("service a {\n    endpoint http://127.0.0.1:1\n}\n", encoding="utf-8")
    res = run_cli(str(path), "--engine", "envoy", "--envoy", str(tmp_path / "no-envoy"))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "no-envoy" in res.stderr
    assert "Traceback" not in res.stderr


def test_listen_port_in_use_is_exit_2(tmp_path: Path, ups: tuple[Upstream, Upstream]) -> None:
    path = tmp_path / "p.riprap"
    path.write_text(base_policy(ups[0].url, ups[1].url), encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = run_cli(str(path), "--engine", "envoy", "--listen", f"127.0.0.1:{port}",
                      "--admin", f"127.0.0.1:{free_port()}")
    assert res.returncode == 2, res.stderr
    assert "in use" in res.stderr and "Traceback" not in res.stderr


def test_sigterm_drains_calls_in_flight_and_exits_0(tmp_path: Path,
                                                     ups: tuple[Upstream, Upstream]) -> None:
    path = tmp_path / "p.riprap"
    path.write_text(base_policy(ups[0].url, ups[1].url), encoding="utf-8")
    sc = start(path, "--grace", "1")
    out: list[httpx.Response] = []
    t = threading.Thread(target=lambda: out.append(sc.get("/api/sleep/1.5/drain")))
    t.start()
    time.sleep(0.3)
    assert sc.proc is not None
    sc.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: sc.admin.get("/readyz").status_code == 503, 2)
    t.join(10)
    assert out and out[0].status_code == 200  # the call in flight finished
    assert sc.proc.wait(20) == 0
    sc.stop()


def test_killed_envoy_is_restarted_and_readyz_is_503_meanwhile(
        tmp_path: Path, ups: tuple[Upstream, Upstream]) -> None:
    path = tmp_path / "p.riprap"
    path.write_text(base_policy(ups[0].url, ups[1].url), encoding="utf-8")
    sc = start(path)
    try:
        state = sc.admin.get("/state").json()
        pid = state["envoy"]["pid"]
        assert isinstance(pid, int) and state["envoy"]["running"] is True
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: sc.admin.get("/readyz").status_code == 503, 5)
        assert sc.admin.get("/readyz").json()["status"] in ("envoy-down", "ready")
        assert wait_for(lambda: sc.admin.get("/readyz").status_code == 200, 20)
        state = sc.admin.get("/state").json()
        assert state["envoy"]["restarts"] == 1 and state["envoy"]["pid"] != pid
        r = sc.get("/api/after-restart")
        assert r.status_code == 200 and r.json()["upstream"] in ("A", "B")
    finally:
        sc.stop()


def _fake_envoy(tmp_path: Path, marker: Path) -> Path:
    """Envoy itself, except that `--mode validate` refuses while `marker` exists."""
    script = tmp_path / "envoy-refusing"
    script.write_text(f"""#!/bin/sh
if [ "$1" = "--mode" ] && [ -e "{marker}" ]; then
  echo "[2026-01-01 00:00:00.000][1][critical][main] [source/server/config_validation/server.cc:76] error initializing configuration 'x.json': riprap test: this configuration is refused" >&2
  exit 1
fi
exec "{find_envoy()}" "$@"
""", encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_a_configuration_envoy_refuses_is_never_put_in_force(
        tmp_path: Path, ups: tuple[Upstream, Upstream]) -> None:
    marker = tmp_path / "refuse"
    path = tmp_path / "p.riprap"
    path.write_text(base_policy(ups[0].url, ups[1].url), encoding="utf-8")
    sc = start(path, "--envoy", str(_fake_envoy(tmp_path, marker)))
    try:
        before = sc.admin.get("/plan").json()["hash"]
        marker.touch()
        write(path, base_policy(ups[0].url, ups[1].url,
                                f"service extra {{\n    endpoint {ups[0].url}\n}}\n"))
        doc = wait_for(lambda: (lambda d: d if d["last_error"] else None)(
            sc.admin.get("/plan").json()), 5)
        assert doc is not None, sc.logs()
        assert doc["hash"] == before
        assert "this configuration is refused" in doc["last_error"][0]["message"]
        assert sc.get("/api/still").status_code == 200  # the old configuration serves
        assert sc.get("/extra/x").status_code == 404
        metrics = sc.admin.get("/metrics").text
        errors = re.search(r'riprap_reloads_total\{result="error"\} ([0-9.]+)', metrics)
        assert errors is not None and float(errors.group(1)) >= 1
        marker.unlink()
        write(path, base_policy(ups[0].url, ups[1].url,
                                f"service extra {{\n    endpoint {ups[1].url}\n}}\n"))
        assert wait_for(lambda: sc.admin.get("/plan").json()["last_error"] is None, 5)
        assert wait_for(lambda: sc.get("/extra/x").status_code == 200, 2)
    finally:
        sc.stop()


def test_a_change_that_does_not_compile_keeps_the_running_plan(
        tmp_path: Path, ups: tuple[Upstream, Upstream]) -> None:
    path = tmp_path / "p.riprap"
    path.write_text(base_policy(ups[0].url, ups[1].url), encoding="utf-8")
    sc = start(path)
    try:
        before = sc.admin.get("/plan").json()["hash"]
        write(path, "service api {\n    endpoint nope\n    retry lots\n}\n")
        doc = wait_for(lambda: (lambda d: d if d["last_error"] else None)(
            sc.admin.get("/plan").json()), 5)
        assert doc is not None and doc["hash"] == before
        assert sc.get("/api/x").status_code == 200
    finally:
        sc.stop()


def test_hot_reload_under_load_drops_nothing(tmp_path: Path,
                                             ups: tuple[Upstream, Upstream]) -> None:
    """100 reloads under about 200 calls/s (issue 11): every call answered 200, each reload in force."""
    a, b = ups
    path = tmp_path / "p.riprap"
    path.write_text(base_policy(a.url, b.url), encoding="utf-8")
    sc = start(path)
    results: list[int | str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=sc.url, trust_env=False, timeout=5) as c:
            n = 0
            while not stop.is_set() and n < 20_000:
                t = time.monotonic()
                try:
                    results.append(c.get(f"/api/load/{n}").status_code)
                except httpx.HTTPError as exc:
                    results.append(type(exc).__name__)
                n += 1
                time.sleep(max(0.0, 0.01 - (time.monotonic() - t)))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        hashes = {sc.admin.get("/plan").json()["hash"]}
        took: list[float] = []
        for i in range(100):
            extra = f"service v{i} {{\n    endpoint {a.url}\n    timeout {100 + i}ms\n}}\n"
            weight = 1 + i % 3
            write(path, base_policy(a.url, f"{b.url} weight {weight}", extra))
            t0 = time.monotonic()
            got = wait_for(lambda: (lambda h: h if h not in hashes else None)(
                sc.admin.get("/plan").json()["hash"]), 3, step=0.01)
            assert got is not None, f"reload {i} not in force: {sc.logs()}"
            took.append(time.monotonic() - t0)
            hashes.add(got)
            assert wait_for(lambda i=i: sc.get(f"/v{i}/x").status_code == 200, 1, step=0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        sc.stop()
    failed = [r for r in results if r != 200]
    assert len(results) > 200 and not failed, (len(results), failed[:10])
    # In force quickly: about 0.2-0.4 s on an idle 2-core machine (tests/bench/proxy_bench.py
    # prints the figure against the contract's 1 s); here the bound allows for a machine
    # that runs several test suites at once, most of a reload being `envoy --mode validate`.
    assert sorted(took)[len(took) // 2] < 2.5, took


def test_the_app_supervisor_works_on_the_envoy_engine(tmp_path: Path,
                                                     ups: tuple[Upstream, Upstream]) -> None:
    path = tmp_path / "p.riprap"
    app = 'app sup {\n    run "exec sleep 60"\n    restart backoff 100ms..1s\n}\n'
    path.write_text(app + base_policy(ups[0].url, ups[1].url).replace("app envoycli\n", ""),
                    encoding="utf-8")
    sc = start(path)
    try:
        # each /state reads Envoy's admin API: under load one poll may take a second or more
        first: Any = wait_for(lambda: sc.admin.get("/state").json()["app"]["pid"], 20)
        assert first, sc.logs()
        os.kill(first, signal.SIGKILL)
        again = wait_for(lambda: (lambda p: p if p and p != first else None)(
            sc.admin.get("/state").json()["app"]["pid"]), 20)
        assert again, "the app was not restarted"
        assert sc.admin.get("/state").json()["app"]["restarts"] == 1
    finally:
        assert sc.stop() == 0
