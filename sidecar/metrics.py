"""Prometheus metrics for one sidecar, fed by the engine through the `Observer` protocol.

One `CollectorRegistry` per sidecar (not the global default) so that several sidecars in
one test process never share counters. Label values are bounded: services, shards and
endpoints come from the plan; outcomes, reasons, kinds and states from small fixed sets
(anything else is folded into `other`). Label children are cached per label tuple, so the
hot path does one dict lookup and one lock-protected add per metric. Every observer method
swallows its own errors: metrics must never break a call.

Every metric is documented in docs/metrics.md.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

log = logging.getLogger("riprap.metrics")

OUTCOMES = frozenset({
    "ok", "upstream-5xx", "upstream-4xx", "unknown-service", "no-shard-key", "rate-limited",
    "overloaded", "breaker-open", "no-healthy-endpoint", "timeout", "upstream-failed",
    "cancelled", "fallback",
})
ATTEMPT_OUTCOMES = frozenset({
    "ok", "2xx", "3xx", "4xx", "5xx", "connect-failure", "reset", "timeout", "cancelled",
    "breaker-open", "chaos", "invalid-request",
})
FALLBACK_KINDS = frozenset({"static", "stale", "service"})
BREAKER_STATES = {"closed": 0.0, "half-open": 1.0, "open": 2.0}
REFUSAL_WHY = frozenset({"budget", "deadline", "body", "method"})
REJECTED_BY = frozenset({"limit", "concurrency"})
RELOAD_RESULTS = frozenset({"ok", "error", "unchanged"})
UNKNOWN_SERVICE = "_unknown"  # service label of calls that named no service (not a valid name)
MAX_LABEL_SETS = 20_000  # hard cap on label tuples per metric, whatever the plans say

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0)


_EXTRA_VALUES: dict[frozenset[str], set[str]] = {}
MAX_EXTRA_VALUES = 32  # values outside a known set allowed per label, then `other`


def _bounded(value: str | None, allowed: frozenset[str]) -> str:
    """The value itself when known (or one of a few short unknown ones), else `other`.

    Unknown values are let through up to a small cap so that a new outcome the engine
    reports shows up by name instead of disappearing, without unbounded cardinality.
    """
    if value is None:
        return "none"
    if value in allowed:
        return value
    extra = _EXTRA_VALUES.setdefault(allowed, set())
    if value in extra:
        return value
    if len(extra) < MAX_EXTRA_VALUES and len(value) <= 32 and value.replace("-", "").isalnum():
        extra.add(value)
        return value
    return "other"


class _Cache:
    """labels() children cached by label tuple, capped so memory stays bounded."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}

    def get(self, *labels: str) -> Any:
        child = self.children.get(labels)
        if child is None:
            if len(self.children) >= MAX_LABEL_SETS:
                labels = tuple("other" for _ in labels)
                child = self.children.get(labels)
                if child is not None:
                    return child
            child = self.metric.labels(*labels)
            self.children[labels] = child
        return child


class SidecarMetrics:
    """All of one sidecar's metrics, and the `Observer` the engine calls."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = _Cache(Counter(
            "riprap_calls", "Calls handled, by service and outcome.",
            ["service", "outcome"], registry=r))
        self.call_duration = _Cache(Histogram(
            "riprap_call_duration_seconds",
            "Whole-call time until the answer's headers, retries and hedges included.",
            ["service"], buckets=LATENCY_BUCKETS, registry=r))
        self.call_attempts = _Cache(Histogram(
            "riprap_call_attempts", "Attempts sent upstream per call.", ["service"],
            buckets=(0, 1, 2, 3, 4, 5, 6, 8, 10), registry=r))
        self.attempts = _Cache(Counter(
            "riprap_attempts", "Attempts sent upstream, by endpoint and outcome.",
            ["service", "endpoint", "outcome"], registry=r))
        self.upstream_latency = _Cache(Histogram(
            "riprap_upstream_latency_seconds",
            "Latency of single attempts to the upstream (until headers).",
            ["service"], buckets=LATENCY_BUCKETS, registry=r))
        self.retries = _Cache(Counter(
            "riprap_retries", "Retries started.", ["service"], registry=r))
        self.retries_refused = _Cache(Counter(
            "riprap_retries_refused",
            "Retries not started: by the retry budget, or for lack of time before the deadline.",
            ["service", "why"], registry=r))
        self.hedges = _Cache(Counter(
            "riprap_hedges", "Hedged (extra) attempts sent.", ["service"], registry=r))
        self.breaker_state = _Cache(Gauge(
            "riprap_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["service", "shard"], registry=r))
        self.breaker_transitions = _Cache(Counter(
            "riprap_breaker_transitions", "Circuit breaker state changes, by new state.",
            ["service", "shard", "state"], registry=r))
        self.ejections = _Cache(Counter(
            "riprap_ejections", "Endpoints ejected by outlier detection.",
            ["service", "endpoint"], registry=r))
        self.rejections = _Cache(Counter(
            "riprap_rejections", "Calls rejected by the rate limiter or the concurrency cap.",
            ["service", "by"], registry=r))
        self.fallbacks = _Cache(Counter(
            "riprap_fallbacks", "Calls answered by a fallback, by kind.",
            ["service", "kind"], registry=r))
        self.endpoint_healthy = _Cache(Gauge(
            "riprap_endpoint_healthy", "Active health check verdict: 1 healthy, 0 unhealthy.",
            ["service", "endpoint"], registry=r))
        self.in_flight = Gauge(
            "riprap_in_flight", "Calls the sidecar is handling right now.", registry=r)
        self.reloads = _Cache(Counter(
            "riprap_reloads", "Plan reloads, by result (ok, error, unchanged).",
            ["result"], registry=r))
        self.plan_info = Info("riprap_plan", "The running plan: its hash and app.", registry=r)
        self.plan_loaded = Gauge(
            "riprap_plan_loaded_timestamp_seconds", "When the running plan was loaded (unix time).",
            registry=r)
        self.draining = Gauge(
            "riprap_draining", "1 while the sidecar drains for shutdown.", registry=r)
        self.app_restarts = _Cache(Counter(
            "riprap_app_restarts", "Restarts of the supervised app, by cause (exit, health).",
            ["app", "cause"], registry=r))
        self.app_up = _Cache(Gauge(
            "riprap_app_up", "1 while the supervised app's process runs.", ["app"], registry=r))
        for result in sorted(RELOAD_RESULTS):
            self.reloads.get(result)

    # -- exposition ---------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # -- sidecar-side events ----------------------------------------------------------
    def plan_loaded_now(self, digest: str, app: str) -> None:
        self.plan_info.info({"hash": digest, "app": app})
        self.plan_loaded.set(time.time())

    def reloaded(self, result: str) -> None:
        self.reloads.get(_bounded(result, RELOAD_RESULTS)).inc()

    def app_restarted(self, app: str, cause: str) -> None:
        self.app_restarts.get(app, cause).inc()

    def app_running(self, app: str, up: bool) -> None:
        self.app_up.get(app).set(1.0 if up else 0.0)

    # -- Observer protocol (policies/observer.py) -------------------------------------
    def call_finished(self, service: str, outcome: str, status: int, attempts: int,
                      duration: float, fallback: str | None) -> None:
        try:
            self.calls.get(service, _bounded(outcome, OUTCOMES)).inc()
            self.call_duration.get(service).observe(duration)
            self.call_attempts.get(service).observe(attempts)
            if fallback is not None:
                self.fallbacks.get(service, _bounded(fallback, FALLBACK_KINDS)).inc()
        except Exception:  # noqa: BLE001 - metrics must never break a call
            log.debug("metrics: call_finished failed", exc_info=True)

    def attempt_finished(self, service: str, endpoint: str, outcome: str,
                         latency: float) -> None:
        try:
            self.attempts.get(service, endpoint, _bounded(outcome, ATTEMPT_OUTCOMES)).inc()
            self.upstream_latency.get(service).observe(latency)
        except Exception:  # noqa: BLE001
            log.debug("metrics: attempt_finished failed", exc_info=True)

    def retried(self, service: str) -> None:
        self._safe(lambda: self.retries.get(service).inc())

    def retry_refused(self, service: str, why: str) -> None:
        self._safe(lambda: self.retries_refused.get(service, _bounded(why, REFUSAL_WHY)).inc())

    def hedged(self, service: str) -> None:
        self._safe(lambda: self.hedges.get(service).inc())

    def breaker_changed(self, service: str, shard: str | None, state: str) -> None:
        def do() -> None:
            label = shard or ""
            self.breaker_state.get(service, label).set(BREAKER_STATES.get(state, -1.0))
            self.breaker_transitions.get(
                service, label, state if state in BREAKER_STATES else "other").inc()
        self._safe(do)

    def ejected(self, service: str, endpoint: str) -> None:
        self._safe(lambda: self.ejections.get(service, endpoint).inc())

    def rejected(self, service: str, by: str) -> None:
        self._safe(lambda: self.rejections.get(service, _bounded(by, REJECTED_BY)).inc())

    def health_changed(self, service: str, endpoint: str, healthy: bool) -> None:
        self._safe(lambda: self.endpoint_healthy.get(service, endpoint).set(1.0 if healthy else 0.0))

    @staticmethod
    def _safe(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001
            log.debug("metrics: observer call failed", exc_info=True)


class FanoutObserver:
    """Sends each event to several observers (metrics and the access log), isolating each."""

    def __init__(self, *observers: Any) -> None:
        self.observers = observers

    def __getattr__(self, name: str) -> Callable[..., None]:
        targets = [getattr(o, name) for o in self.observers if hasattr(o, name)]

        def call(*args: Any, **kwargs: Any) -> None:
            for t in targets:
                try:
                    t(*args, **kwargs)
                except Exception:  # noqa: BLE001
                    log.debug("observer %s failed", name, exc_info=True)
        setattr(self, name, call)  # cache: next lookups skip __getattr__
        return call
