"""The Prometheus observer: every metric the issue lists, per-app registry, bounded labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from sidecar.metrics import MAX_EXTRA_VALUES, FanoutObserver, SidecarMetrics


def samples(m: SidecarMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render()[0].decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: SidecarMetrics, name: str, **labels: str) -> float:
    return samples(m).get((name, frozenset(labels.items())), 0.0)


def test_every_listed_metric_is_fed_by_the_observer() -> None:
    m = SidecarMetrics()
    m.call_finished("pay", "ok", 200, 2, 0.012, None)
    m.call_finished("pay", "breaker-open", 503, 0, 0.0001, "static")
    m.attempt_finished("pay", "http://127.0.0.1:9001", "5xx", 0.004)
    m.retried("pay")
    m.retry_refused("pay", "budget")
    m.hedged("pay")
    m.breaker_changed("pay", None, "open")
    m.ejected("pay", "http://127.0.0.1:9001")
    m.rejected("pay", "limit")
    m.rejected("pay", "concurrency")
    m.health_changed("pay", "http://127.0.0.1:9001", False)
    m.reloaded("ok")
    m.reloaded("error")
    m.plan_loaded_now("abc123", "checkout")
    m.app_restarted("checkout", "health")
    assert value(m, "riprap_calls_total", service="pay", outcome="ok") == 1
    assert value(m, "riprap_calls_total", service="pay", outcome="breaker-open") == 1
    assert value(m, "riprap_attempts_total", service="pay", endpoint="http://127.0.0.1:9001",
                 outcome="5xx") == 1
    assert value(m, "riprap_retries_total", service="pay") == 1
    assert value(m, "riprap_retries_refused_total", service="pay", why="budget") == 1
    assert value(m, "riprap_hedges_total", service="pay") == 1
    assert value(m, "riprap_breaker_state", service="pay", shard="") == 2
    assert value(m, "riprap_ejections_total", service="pay", endpoint="http://127.0.0.1:9001") == 1
    assert value(m, "riprap_rejections_total", service="pay", by="limit") == 1
    assert value(m, "riprap_rejections_total", service="pay", by="concurrency") == 1
    assert value(m, "riprap_upstream_latency_seconds_count", service="pay") == 1
    assert value(m, "riprap_fallbacks_total", service="pay", kind="static") == 1
    assert value(m, "riprap_endpoint_healthy", service="pay", endpoint="http://127.0.0.1:9001") == 0
    assert value(m, "riprap_reloads_total", result="ok") == 1
    assert value(m, "riprap_reloads_total", result="error") == 1
    assert value(m, "riprap_plan_info", hash="abc123", app="checkout") == 1
    assert value(m, "riprap_app_restarts_total", app="checkout", cause="health") == 1


def test_each_sidecar_has_its_own_registry() -> None:
    a, b = SidecarMetrics(), SidecarMetrics()
    a.retried("x")
    assert value(a, "riprap_retries_total", service="x") == 1
    assert value(b, "riprap_retries_total", service="x") == 0


def test_unknown_label_values_are_bounded() -> None:
    m = SidecarMetrics()
    for i in range(MAX_EXTRA_VALUES * 3):
        m.rejected("svc", f"weird-{i}")
    whys = {dict(k[1])["by"] for k in samples(m) if k[0] == "riprap_rejections_total"}
    assert "other" in whys
    assert len(whys) <= MAX_EXTRA_VALUES + 1


def test_observer_never_raises() -> None:
    m = SidecarMetrics()
    m.call_finished("svc", "ok", 200, 1, float("nan"), None)  # nan observes fine
    m.attempt_finished(None, None, None, "x")  # type: ignore[arg-type]
    m.breaker_changed("svc", None, "sideways")
    # and it still counts what it was told, and still renders
    assert value(m, "riprap_calls_total", service="svc", outcome="ok") == 1.0


def test_fanout_isolates_a_failing_observer() -> None:
    class Boom:
        def retried(self, service: str) -> None:
            raise RuntimeError("boom")

    m = SidecarMetrics()
    FanoutObserver(Boom(), m).retried("svc")
    assert value(m, "riprap_retries_total", service="svc") == 1
