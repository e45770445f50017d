"""The supervisor's start grace (sidecar/supervisor.py), with real processes and sockets.

An app that takes longer than `fall x every` to bind its port is not killed in a restart
loop: until it answers a check, "nothing listening" does not count during START_GRACE after
the start. An app that answers badly is restarted after `fall` checks as before, and one
that never listens is restarted once the grace is over.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from dsl.plan import AppHealthSpec, SuperviseSpec
from riprap_testing.faults import free_port
from sidecar import supervisor as supervisor_mod
from sidecar.metrics import SidecarMetrics
from sidecar.supervisor import Supervisor

pytestmark = pytest.mark.slow

SLOW_APP = """\
import sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
time.sleep(float(sys.argv[2]))  # a slow start: the port is bound this late
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(int(sys.argv[3]))
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def spec(tmp_path: Path, port: int, delay: float, status: int) -> SuperviseSpec:
    app = tmp_path / "slow_app.py"
    app.write_text(SLOW_APP)
    return SuperviseSpec(
        run=f"exec {sys.executable} {app} {port} {delay} {status}",
        health=AppHealthSpec(url=f"http://127.0.0.1:{port}/healthz", interval=0.1,
                             timeout=0.3, fall=2),
        restart_base=0.1, restart_max=0.5, stop_timeout=2.0)


async def until(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_slow_starter_is_not_restarted(tmp_path: Path) -> None:
    # binds its port 1.5 s after the start: 7 times `fall x every`
    sup = Supervisor("slow", spec(tmp_path, free_port(), 1.5, 200), SidecarMetrics())
    sup.start()
    try:
        assert await until(lambda: sup.healthy is True, 15), sup.snapshot()
        assert sup.restarts == 0, sup.snapshot()
        assert sup.snapshot()["running"] is True
    finally:
        await sup.stop()


async def test_an_app_answering_errors_is_restarted_after_fall_checks(tmp_path: Path) -> None:
    sup = Supervisor("sick", spec(tmp_path, free_port(), 0.0, 500), SidecarMetrics())
    sup.start()
    t0 = time.monotonic()
    try:
        assert await until(lambda: sup.restarts >= 1, 15), sup.snapshot()
        # well before the grace: an answer that fails counts from the start
        assert time.monotonic() - t0 < supervisor_mod.START_GRACE, sup.snapshot()
        assert sup.last_cause == "health"
    finally:
        await sup.stop()


async def test_an_app_that_never_listens_is_restarted_after_the_grace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_mod, "START_GRACE", 1.0)
    sup = Supervisor("mute", SuperviseSpec(
        run="exec sleep 60",
        health=AppHealthSpec(url=f"http://127.0.0.1:{free_port()}/healthz", interval=0.1,
                             timeout=0.3, fall=2),
        restart_base=0.1, restart_max=0.5, stop_timeout=2.0), SidecarMetrics())
    sup.start()
    t0 = time.monotonic()
    try:
        assert await until(lambda: sup.restarts >= 1, 15), sup.snapshot()
        assert time.monotonic() - t0 >= 1.0  # not before the grace is over
        assert sup.last_cause == "health"
    finally:
        await sup.stop()
