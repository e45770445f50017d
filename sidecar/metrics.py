"""Prometheus metrics for one sidecar, fed by the engine through the `Observer` protocol.

Why not prometheus-client's `Counter`/`Histogram` objects on the hot path: each
`inc`/`observe` takes a lock and walks the buckets in Python, about 10 us per proxied call
in all, a measurable share of a forwarder's budget. Every observer call runs on the
sidecar's one event loop thread, so the values are plain numbers in dicts, updated
without locks. prometheus-client still renders the exposition: a custom collector,
registered in a per-sidecar `CollectorRegistry` (never the global one, so several sidecars
in one test process never share counters), builds the metric families at scrape time.
Scrapes run on the same loop, so they always see a consistent state.

Label values are bounded: services, shards and endpoints come from the plan; outcomes,
reasons, kinds and states from small fixed sets (a few unknown values are let through by
name, then `other`); and each metric keeps at most `MAX_LABEL_SETS` label sets. Observer
methods swallow their own errors: metrics must never break a call.

Every metric is documented in docs/metrics.md.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from typing import Any, Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

log = logging.getLogger("riprap.metrics")

OUTCOMES = frozenset({
    "ok", "upstream-5xx", "upstream-4xx", "unknown-service", "no-shard-key", "rate-limited",
    "overloaded", "breaker-open", "no-healthy-endpoint", "timeout", "upstream-failed",
    "cancelled", "connect-unsupported", "bad-request", "headers-too-large",
    "upgrade-unsupported",
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
RESTART_CAUSES = frozenset({"exit", "health", "reload"})
# = policies.store.ERROR_KINDS (not imported: that would load redis for every sidecar)
STORE_ERROR_KINDS = ("timeout", "connection", "auth", "response", "other")
DNS_RESULTS = frozenset({"ok", "empty", "nxdomain", "timeout", "servfail", "refused",
                         "unreachable", "error"})  # policies.discovery.RESULTS
UNKNOWN_SERVICE = "_unknown"  # service label of calls that named no service (not a valid name)
MAX_LABEL_SETS = 20_000  # hard cap on label tuples per metric, whatever the plans say
MAX_EXTRA_VALUES = 32  # values outside a known set allowed per label, then `other`

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0)
ATTEMPT_BUCKETS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)

_EXTRA_VALUES: dict[frozenset[str], set[str]] = {}


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


def _key(store: dict[tuple[str, ...], Any], labels: tuple[str, ...]) -> tuple[str, ...]:
    """`labels`, or all-`other` once the metric holds MAX_LABEL_SETS label sets."""
    if labels in store or len(store) < MAX_LABEL_SETS:
        return labels
    return tuple("other" for _ in labels)


class _Counter:
    __slots__ = ("name", "doc", "labels", "values")

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        values = self.values
        value = values.get(labels)
        if value is None:
            labels = _key(values, labels)
            value = values.get(labels, 0.0)
        values[labels] = value + amount

    def family(self) -> CounterMetricFamily:
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for labels, value in self.values.items():
            fam.add_metric(labels, value)
        return fam


class _Gauge:
    __slots__ = ("name", "doc", "labels", "values")

    def __init__(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[tuple[str, ...], float] = {}

    def set(self, labels: tuple[str, ...], value: float) -> None:
        self.values[_key(self.values, labels)] = value

    def family(self) -> GaugeMetricFamily:
        fam = GaugeMetricFamily(self.name, self.doc, labels=self.labels)
        for labels, value in self.values.items():
            fam.add_metric(labels, value)
        return fam


class _Histogram:
    """Per label set: one count per bucket (not cumulative; summed at scrape), then sum."""

    __slots__ = ("name", "doc", "labels", "bounds", "data")

    def __init__(self, name: str, doc: str, labels: tuple[str, ...],
                 bounds: tuple[float, ...]) -> None:
        self.name, self.doc, self.labels, self.bounds = name, doc, labels, bounds
        self.data: dict[tuple[str, ...], list[float]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        row = self.data.get(labels)
        if row is None:
            labels = _key(self.data, labels)
            row = self.data.setdefault(labels, [0.0] * (len(self.bounds) + 2))
        row[bisect_left(self.bounds, value)] += 1  # the last bucket is +Inf
        row[-1] += value

    def family(self) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        edges = [repr(float(b)) for b in self.bounds] + ["+Inf"]
        for labels, row in self.data.items():
            total, buckets = 0.0, []
            for edge, count in zip(edges, row[:-1], strict=True):
                total += count
                buckets.append((edge, total))
            fam.add_metric(labels, buckets, row[-1])
        return fam


class SidecarMetrics(Collector):
    """All of one sidecar's metrics, the `Observer` the engine calls, and their collector."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.calls = _Counter("riprap_calls", "Calls handled, by service and outcome.",
                              ("service", "outcome"))
        self.call_duration = _Histogram(
            "riprap_call_duration_seconds",
            "Whole-call time until the answer's headers, retries and hedges included.",
            ("service",), LATENCY_BUCKETS)
        self.call_attempts = _Histogram(
            "riprap_call_attempts", "Attempts sent upstream per call.", ("service",),
            ATTEMPT_BUCKETS)
        self.attempts = _Counter("riprap_attempts",
                                 "Attempts sent upstream, by endpoint and outcome.",
                                 ("service", "endpoint", "outcome"))
        self.upstream_latency = _Histogram(
            "riprap_upstream_latency_seconds",
            "Latency of single attempts to the upstream (until headers).",
            ("service",), LATENCY_BUCKETS)
        self.retries = _Counter("riprap_retries", "Retries started.", ("service",))
        self.retries_refused = _Counter(
            "riprap_retries_refused",
            "Retries not started: by the retry budget, for lack of time before the deadline, "
            "or because the request body could not be replayed.", ("service", "why"))
        self.hedges = _Counter("riprap_hedges", "Hedged (extra) attempts sent.", ("service",))
        self.breaker_state = _Gauge("riprap_breaker_state",
                                    "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
                                    ("service", "shard"))
        self.breaker_transitions = _Counter(
            "riprap_breaker_transitions", "Circuit breaker state changes, by new state.",
            ("service", "shard", "state"))
        self.ejections = _Counter("riprap_ejections",
                                  "Endpoints ejected by outlier detection.",
                                  ("service", "endpoint"))
        self.rejections = _Counter(
            "riprap_rejections", "Calls rejected by the rate limiter or the concurrency cap.",
            ("service", "by"))
        self.fallbacks = _Counter("riprap_fallbacks", "Calls answered by a fallback, by kind.",
                                  ("service", "kind"))
        self.endpoint_healthy = _Gauge(
            "riprap_endpoint_healthy", "Active health check verdict: 1 healthy, 0 unhealthy.",
            ("service", "endpoint"))
        self.reloads = _Counter("riprap_reloads", "Plan reloads, by result (ok, error, unchanged).",
                                ("result",))
        self.app_restarts = _Counter(
            "riprap_app_restarts", "Restarts of the supervised app, by cause (exit, health, reload).",
            ("app", "cause"))
        self.app_up = _Gauge("riprap_app_up", "1 while the supervised app's process runs.",
                             ("app",))
        self.dns_lookups = _Counter(
            "riprap_dns_lookups",
            "DNS lookups of `resolve` lines, by result (ok, empty, nxdomain: answers; "
            "timeout, servfail, refused, unreachable, error: failures, last addresses kept).",
            ("service", "shard", "line", "result"))
        self.dns_addresses = _Gauge(
            "riprap_dns_addresses", "Addresses a `resolve` line has now (its endpoints).",
            ("service", "shard", "line"))
        for result in sorted(RELOAD_RESULTS):
            self.reloads.inc((result,), 0.0)
        self.plan: dict[str, str] = {}
        self.plan_loaded_at = 0.0
        self.draining = False
        self.in_flight_source: Callable[[], float] = lambda: 0.0
        # the shared store: (up, or None without a store; errors by kind), read at scrape
        self.store_source: Callable[[], tuple[bool | None, dict[str, int]]] = lambda: (None, {})
        self._counters = (self.calls, self.attempts, self.retries, self.retries_refused,
                          self.hedges, self.breaker_transitions, self.ejections,
                          self.rejections, self.fallbacks, self.reloads, self.app_restarts,
                          self.dns_lookups)
        self._gauges = (self.breaker_state, self.endpoint_healthy, self.app_up,
                        self.dns_addresses)
        self._histograms = (self.call_duration, self.call_attempts, self.upstream_latency)
        self.registry = registry or CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # -- exposition ---------------------------------------------------------------
    def collect(self) -> Iterator[Any]:
        for metric in (*self._counters, *self._gauges, *self._histograms):
            yield metric.family()
        yield GaugeMetricFamily("riprap_in_flight", "Calls the sidecar is handling right now.",
                                value=float(self.in_flight_source()))
        info = InfoMetricFamily("riprap_plan", "The running plan: its hash and app.")
        if self.plan:
            info.add_metric([], self.plan)
        yield info
        yield GaugeMetricFamily("riprap_plan_loaded_timestamp_seconds",
                                "When the running plan was loaded (unix time).",
                                value=self.plan_loaded_at)
        yield GaugeMetricFamily("riprap_draining", "1 while the sidecar drains for shutdown.",
                                value=1.0 if self.draining else 0.0)
        yield from self._store_families()

    def _store_families(self) -> Iterator[Any]:
        up, errors = self.store_source()
        gauge = GaugeMetricFamily(
            "riprap_store_up", "1 while the shared store answers within its deadline, 0 while "
            "it is down (shared limits then use each sidecar's local share).")
        counter = CounterMetricFamily("riprap_store_errors",
                                      "Store operations that failed or missed their deadline, by kind.",
                                      labels=("kind",))
        if up is not None:
            gauge.add_metric([], 1.0 if up else 0.0)
        if up is not None or errors:
            for kind in STORE_ERROR_KINDS:
                counter.add_metric([kind], float(errors.get(kind, 0)))
            for kind, count in errors.items():
                if kind not in STORE_ERROR_KINDS:
                    counter.add_metric([_bounded(kind, frozenset(STORE_ERROR_KINDS))], float(count))
        yield gauge
        yield counter

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # -- sidecar-side events ----------------------------------------------------------
    def plan_loaded_now(self, digest: str, app: str) -> None:
        self.plan = {"hash": digest, "app": app}
        self.plan_loaded_at = time.time()

    def reloaded(self, result: str) -> None:
        self.reloads.inc((_bounded(result, RELOAD_RESULTS),))

    def refused(self, reason: str) -> None:
        """A call the router would not forward (it names no service of the plan)."""
        self.calls.inc((UNKNOWN_SERVICE, _bounded(reason, OUTCOMES)))

    def app_restarted(self, app: str, cause: str) -> None:
        self.app_restarts.inc((app, _bounded(cause, RESTART_CAUSES)))

    def app_running(self, app: str, up: bool) -> None:
        self.app_up.set((app,), 1.0 if up else 0.0)

    # -- Observer protocol (policies/observer.py) -------------------------------------
    def call_finished(self, service: str, outcome: str, status: int, attempts: int,
                      duration: float, fallback: str | None) -> None:
        try:
            key = (service,)
            self.calls.inc((service, outcome if outcome in OUTCOMES
                            else _bounded(outcome, OUTCOMES)))
            self.call_duration.observe(key, duration)
            self.call_attempts.observe(key, attempts)
            if fallback is not None:
                self.fallbacks.inc((service, _bounded(fallback, FALLBACK_KINDS)))
        except Exception:  # noqa: BLE001 - metrics must never break a call
            log.debug("metrics: call_finished failed", exc_info=True)

    def attempt_finished(self, service: str, endpoint: str, outcome: str,
                         latency: float) -> None:
        try:
            if not (isinstance(service, str) and isinstance(endpoint, str)):
                return  # a bad event is dropped whole: a None label would break the scrape
            self.upstream_latency.observe((service,), latency)
            self.attempts.inc((service, endpoint, outcome if outcome in ATTEMPT_OUTCOMES
                               else _bounded(outcome, ATTEMPT_OUTCOMES)))
        except Exception:  # noqa: BLE001
            log.debug("metrics: attempt_finished failed", exc_info=True)

    def retried(self, service: str) -> None:
        self._safe(lambda: self.retries.inc((service,)))

    def retry_refused(self, service: str, why: str) -> None:
        self._safe(lambda: self.retries_refused.inc((service, _bounded(why, REFUSAL_WHY))))

    def hedged(self, service: str) -> None:
        self._safe(lambda: self.hedges.inc((service,)))

    def breaker_changed(self, service: str, shard: str | None, state: str) -> None:
        def do() -> None:
            label = shard or ""
            self.breaker_state.set((service, label), BREAKER_STATES.get(state, -1.0))
            self.breaker_transitions.inc(
                (service, label, state if state in BREAKER_STATES else "other"))
        self._safe(do)

    def ejected(self, service: str, endpoint: str) -> None:
        self._safe(lambda: self.ejections.inc((service, endpoint)))

    def rejected(self, service: str, by: str) -> None:
        self._safe(lambda: self.rejections.inc((service, _bounded(by, REJECTED_BY))))

    def health_changed(self, service: str, endpoint: str, healthy: bool) -> None:
        self._safe(lambda: self.endpoint_healthy.set((service, endpoint),
                                                     1.0 if healthy else 0.0))

    def dns_lookup(self, service: str, shard: str | None, line: str, result: str,
                   addresses: int) -> None:
        def do() -> None:
            self.dns_lookups.inc((service, shard or "", line, _bounded(result, DNS_RESULTS)))
            self.dns_addresses.set((service, shard or "", line), float(addresses))
        self._safe(do)

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
