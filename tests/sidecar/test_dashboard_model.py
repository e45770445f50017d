"""The dashboard's numbers: rates, success, quantiles and troubled-first order from real metrics."""

from __future__ import annotations

from typing import Any

from sidecar.dashboard.model import DashboardModel, quantile
from sidecar.metrics import SidecarMetrics


class Wall:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _state(**breakers: str) -> dict[str, Any]:
    services: dict[str, Any] = {}
    for name in ("pay", "inv"):
        services[name] = {
            "endpoints": [{"url": f"http://127.0.0.1:1/{name}", "tier": 0, "weight": 1,
                           "healthy": True, "ejected": False, "ejected_for": 0.0, "in_flight": 0}],
            "breaker": {"state": breakers.get(name, "closed"), "retry_in": 4.5, "failures": 5},
        }
    return {"services": services, "sidecar": {"hash": "abc", "app": "shop", "draining": False}}


def test_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.01, 50.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert quantile(buckets, 0.5) == 0.01
    q99 = quantile(buckets, 0.99)
    assert q99 is not None and abs(q99 - (0.01 + 0.09 * 49 / 50)) < 1e-9
    assert quantile([], 0.5) is None
    assert quantile([(0.1, 0.0)], 0.5) is None


def test_rates_and_success_between_two_samples() -> None:
    metrics = SidecarMetrics()
    wall = Wall()
    state = _state()
    model = DashboardModel(metrics.registry.collect, lambda: state, wall=wall)
    model.sample()
    for _ in range(18):
        metrics.call_finished("pay", "ok", 200, 1, 0.004, None)
    for _ in range(2):
        metrics.call_finished("pay", "upstream-5xx", 503, 3, 0.2, None)
    metrics.retried("pay")
    metrics.hedged("pay")
    metrics.rejected("pay", "limit")
    wall.t += 2.0
    model.sample()
    doc = model.document()
    pay = next(s for s in doc["services"] if s["name"] == "pay")
    assert pay["calls_per_second"] == 10.0
    assert pay["success_rate"] == 0.9
    assert pay["retries_per_second"] == 0.5 and pay["hedges_per_second"] == 0.5
    assert pay["rejected_per_second"]["limit"] == 0.5
    assert pay["p50_ms"] is not None and 2.5 <= pay["p50_ms"] <= 5.0
    assert pay["p99_ms"] is not None and pay["p99_ms"] > 100.0
    assert pay["history"]["success"] == [0.9]
    assert doc["app"] == "shop" and doc["hash"] == "abc"


def test_open_breaker_sorts_first_and_says_so() -> None:
    metrics = SidecarMetrics()
    state = _state(pay="open")
    model = DashboardModel(metrics.registry.collect, lambda: state, wall=Wall())
    model.sample()
    doc = model.document()
    assert [s["name"] for s in doc["services"]] == ["pay", "inv"]
    assert doc["services"][0]["breaker"] == "open"
    assert doc["services"][0]["status"] == "down"
    assert doc["services"][1]["status"] == "ok"


def test_removed_service_leaves_the_document() -> None:
    metrics = SidecarMetrics()
    wall = Wall()
    state = _state()
    model = DashboardModel(metrics.registry.collect, lambda: state, wall=wall)
    metrics.call_finished("inv", "ok", 200, 1, 0.004, None)
    model.sample()
    wall.t += 1
    model.sample()
    del state["services"]["inv"]
    assert [s["name"] for s in model.document()["services"]] == ["pay"]
