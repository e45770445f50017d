"""Supervision (contract section 6) through a real sidecar: an app that exits comes back;
an app whose health check fails `fall` times is restarted; stopping the sidecar stops it."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from riprap_testing.faults import free_port

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_app_is_restarted_on_exit_and_on_failed_health(module_tmp: Path, sidecar_proc: Any) -> None:
    port, control = free_port(), free_port()
    policy = module_tmp / "sup.riprap"
    policy.write_text(
        "app sup {\n"
        f'    run "exec {sys.executable} -m riprap_testing.faults --name app --port {port} '
        f'--control-port {control}"\n'
        f"    health GET http://127.0.0.1:{port}/healthz every 100ms timeout 200ms fall 2\n"
        "    restart backoff 50ms..1s\n"
        "}\n\n"
        f"service api {{\n    endpoint http://127.0.0.1:{port}\n}}\n")
    proc = sidecar_proc(policy, "--grace", "0").start()
    try:
        def app() -> dict[str, Any]:
            return proc.admin.get("/state").json()["app"]

        def up_and_healthy(not_pid: int | None = None) -> bool:
            s = app()  # one snapshot per check
            return bool(s["running"] and s["healthy"] and s["pid"] not in (None, not_pid))

        proc.wait_for(up_and_healthy, timeout=10, what="the app to run and pass its health check")
        assert proc.client.get("/api/x").json()["server"] == "app"
        first = app()["pid"]

        os.kill(first, signal.SIGKILL)  # the app dies
        proc.wait_for(lambda: up_and_healthy(not_pid=first), timeout=10,
                      what="the app to come back")
        assert app()["restarts"] == 1
        assert proc.metric("riprap_app_restarts_total", app="sup", cause="exit") == 1
        r = proc.client.get("/api/x")
        assert r.status_code == 200, r.text

        second = app()["pid"]
        httpx.post(f"http://127.0.0.1:{control}/mode", json={"error_rate": 1.0},
                   trust_env=False)  # the app turns sick: its health check fails
        proc.wait_for(lambda: up_and_healthy(not_pid=second), timeout=10,
                      what="the sick app to be restarted")
        assert proc.metric("riprap_app_restarts_total", app="sup", cause="health") == 1
        assert not alive(second)
        last = app()["pid"]
    finally:
        assert proc.stop() == 0, proc.logs()
    assert not alive(last)  # stopping the sidecar stops the app


def test_what_the_app_command_started_is_ended_before_a_restart(
        module_tmp: Path, sidecar_proc: Any) -> None:
    # `run` goes through a shell; when that shell dies, its child (the real app) must not
    # live on holding the port, or every restart would fail with "address in use"
    port, control = free_port(), free_port()
    policy = module_tmp / "wrapped.riprap"
    policy.write_text(
        "app wrapped {\n"
        f'    run "{sys.executable} -m riprap_testing.faults --name app --port {port} '
        f'--control-port {control}; exit 3"\n'
        f"    health GET http://127.0.0.1:{port}/healthz every 100ms timeout 200ms fall 2\n"
        "    restart backoff 50ms..1s\n"
        "}\n\n"
        f"service api {{\n    endpoint http://127.0.0.1:{port}\n}}\n")
    proc = sidecar_proc(policy, "--grace", "0").start()
    try:
        def app() -> dict[str, Any]:
            return proc.admin.get("/state").json()["app"]

        def up_and_healthy(not_pid: int | None = None) -> bool:
            s = app()
            return bool(s["running"] and s["healthy"] and s["pid"] not in (None, not_pid))

        proc.wait_for(up_and_healthy, timeout=10, what="the wrapped app to run")
        shell = app()["pid"]
        os.kill(shell, signal.SIGKILL)  # the wrapper dies; its child still holds the port
        # well under the 10 s SIGKILL grace: a dead (zombie) child must not count as alive
        proc.wait_for(lambda: up_and_healthy(not_pid=shell), timeout=6,
                      what="the app to come back on its port")
        assert app()["restarts"] == 1, proc.logs()
        assert proc.client.get("/api/x").status_code == 200

        stopped = app()["pid"]
        os.killpg(stopped, signal.SIGSTOP)  # the app hangs: its health check fails
        proc.wait_for(lambda: up_and_healthy(not_pid=stopped), timeout=6,
                      what="the hung app to be replaced")
        assert proc.client.get("/api/x").status_code == 200
    finally:
        assert proc.stop() == 0, proc.logs()
