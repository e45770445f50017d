"""`GET /dashboard.json` on both engines: the same figures for the same traffic.

One service with two replicas, one of which answers 503: the retries move its calls to the
other one, the outlier detection ejects it, and the dashboard must say so the same way on
`--engine python` and `--engine envoy` (where riprap reads the figures from Envoy's admin
API and outlier event log): calls/s, success, p50/p99, retries/s, and the ejected endpoint
with the seconds left of its ejection.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from riprap_testing.faults import FaultServer
from tests.acceptance.acc_kit import Sidecar, free_port, wait_for

pytestmark = pytest.mark.timeout(120)

EJECT = 20.0  # seconds: long enough that the ejection outlasts the test


@pytest.fixture(params=("python", "envoy"))
def engine(request: pytest.FixtureRequest) -> str:
    if request.param == "envoy":
        from sidecar.engines.envoy.process import EnvoyNotFound, find_envoy

        try:
            find_envoy()
        except EnvoyNotFound as exc:
            pytest.skip(f"the Envoy engine needs its binary: {exc}")
    return str(request.param)


@pytest.fixture
def replicas() -> Iterator[tuple[FaultServer, FaultServer]]:
    good, bad = FaultServer(name="good").start(), FaultServer(name="bad").start()
    yield good, bad
    good.stop()
    bad.stop()


def _pay(doc: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in doc["services"] if s["name"] == "pay")


def test_dashboard_shows_retries_and_the_ejected_endpoint(
        engine: str, replicas: tuple[FaultServer, FaultServer], tmp_path: Path) -> None:
    good, bad = replicas
    path = tmp_path / "pay.riprap"
    path.write_text(f"""\
app dash
service pay {{
    endpoint {good.url}
    endpoint {bad.url}
    retry 2 on 503 backoff 1ms
    outlier failures 3 eject {EJECT:g}s max 50%
}}
""", encoding="utf-8")
    port, admin = free_port(), free_port()
    side = Sidecar(path, port, admin, "--listen", f"127.0.0.1:{port}", "--admin",
                   f"127.0.0.1:{admin}", "--engine", engine).start(timeout=30)
    try:
        bad.set(error_rate=1.0)
        client = side.client

        def traffic_until(pred: Any, timeout: float) -> Any:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                for _ in range(5):
                    assert client.get("/pay/x").status_code == 200  # retried on the good one
                doc = side.admin.get("/dashboard.json").json()
                if pred(doc):
                    return doc
                time.sleep(0.05)
            return None

        def ejected(doc: dict[str, Any]) -> bool:
            eps = {e["url"]: e for e in _pay(doc)["shards"][0]["endpoints"]}
            return bool(eps[bad.url]["ejected"])

        doc = traffic_until(ejected, 10)
        assert doc is not None, f"{engine}: the failing replica was never shown ejected"
        eps = {e["url"]: e for e in _pay(doc)["shards"][0]["endpoints"]}
        assert 0.0 < eps[bad.url]["ejected_for"] <= EJECT, eps  # seconds left, not unknown
        assert eps[good.url]["ejected"] is False and eps[good.url]["ejected_for"] == 0.0
        assert _pay(doc)["endpoints_down"] == 1 and _pay(doc)["status"] == "warning"

        # the figures of the last second (Envoy's arrive up to about two seconds later)
        def busy(doc: dict[str, Any]) -> bool:
            row = _pay(doc)
            return row["calls_per_second"] > 0 and row["p50_ms"] is not None
        doc = traffic_until(busy, 6)
        assert doc is not None, f"{engine}: no calls/s or p50 on the dashboard"
        row = _pay(doc)
        assert row["success_rate"] == 1.0, row  # every call was answered 200
        assert row["p99_ms"] is not None and row["p99_ms"] >= row["p50_ms"] > 0
        assert row["totals"]["calls"] >= 5 and row["totals"]["retries"] >= 1, row["totals"]
        assert wait_for(lambda: _pay(side.admin.get("/dashboard.json").json())
                        ["totals"]["retries"] >= 1, 3)
    finally:
        side.stop()
