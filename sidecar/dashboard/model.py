"""What the dashboard shows: per-service rates, success, latency and state, sampled each second.

The model reads only what every engine already publishes: the `riprap_*` metric families
(docs/metrics.md) and the `/state` document. It never touches the call path: a sampler task
reads the counters once a second, keeps the difference from the previous reading, and
holds a bounded history (five minutes at one point a second) per service for the charts.
`document()` is the JSON of `GET /dashboard.json` (docs/dashboard.md), which the page polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

log = logging.getLogger("riprap.dashboard")

HISTORY_POINTS = 300  # five minutes at one sample a second
LATENCY_WINDOW = 10  # seconds of histogram deltas behind p50 and p99
SUCCESS_OUTCOMES = frozenset({"ok", "upstream-4xx"})  # the service did its job
CALLER_OUTCOMES = frozenset({"unknown-service", "no-shard-key", "bad-request"})  # not the service's fault

MetricSource = Callable[[], Iterable[Any]]
StateSource = Callable[[], dict[str, Any]]


@dataclass
class _Reading:
    """One service's cumulative counters at one instant."""

    calls: dict[str, float] = field(default_factory=dict)  # outcome -> count
    retries: float = 0.0
    hedges: float = 0.0
    fallbacks: dict[str, float] = field(default_factory=dict)  # kind -> count
    rejections: dict[str, float] = field(default_factory=dict)  # by -> count
    buckets: list[tuple[float, float]] = field(default_factory=list)  # (upper bound, cumulative)


@dataclass
class _Series:
    """A service's rolling history: one point per sample."""

    t: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    rps: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    success: deque[float | None] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    p50: deque[float | None] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    p99: deque[float | None] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    bucket_deltas: deque[list[tuple[float, float]]] = field(
        default_factory=lambda: deque(maxlen=LATENCY_WINDOW))


def read_families(families: Iterable[Any]) -> dict[str, _Reading]:
    """Cumulative counters per service from prometheus-client metric families."""
    out: dict[str, _Reading] = {}

    def of(labels: dict[str, str]) -> _Reading:
        return out.setdefault(labels.get("service", ""), _Reading())

    for fam in families:
        name = fam.name
        if name not in _WANTED:
            continue
        for sample in fam.samples:
            labels, value = sample.labels, float(sample.value)
            if name == "riprap_calls" and sample.name.endswith("_total"):
                r = of(labels)
                outcome = labels.get("outcome", "")
                r.calls[outcome] = r.calls.get(outcome, 0.0) + value
            elif name == "riprap_retries" and sample.name.endswith("_total"):
                of(labels).retries += value
            elif name == "riprap_hedges" and sample.name.endswith("_total"):
                of(labels).hedges += value
            elif name == "riprap_fallbacks" and sample.name.endswith("_total"):
                r = of(labels)
                kind = labels.get("kind", "")
                r.fallbacks[kind] = r.fallbacks.get(kind, 0.0) + value
            elif name == "riprap_rejections" and sample.name.endswith("_total"):
                r = of(labels)
                by = labels.get("by", "")
                r.rejections[by] = r.rejections.get(by, 0.0) + value
            elif name == "riprap_call_duration_seconds" and sample.name.endswith("_bucket"):
                le = labels.get("le", "+Inf")
                bound = math.inf if le == "+Inf" else float(le)
                of(labels).buckets.append((bound, value))
    for r in out.values():
        r.buckets.sort()
    return out


_WANTED = frozenset({"riprap_calls", "riprap_retries", "riprap_hedges", "riprap_fallbacks",
                     "riprap_rejections", "riprap_call_duration_seconds"})


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile (seconds) of cumulative histogram buckets, by linear interpolation.

    The same estimate as Prometheus's `histogram_quantile`; None when there is nothing.
    """
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def _delta(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: max(0.0, v - before.get(k, 0.0)) for k, v in now.items()}


def _bucket_delta(now: list[tuple[float, float]],
                  before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    old = dict(before)
    return [(b, max(0.0, c - old.get(b, 0.0))) for b, c in now]


def _sum_buckets(parts: Iterable[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    acc: dict[float, float] = {}
    for part in parts:
        for bound, count in part:
            acc[bound] = acc.get(bound, 0.0) + count
    return sorted(acc.items())


class DashboardModel:
    """Samples the metrics once a second; `document()` is what the page draws."""

    def __init__(self, metrics: MetricSource, state: StateSource, *,
                 interval: float = 1.0, wall: Callable[[], float] = time.time) -> None:
        self._metrics = metrics
        self._state = state
        self.interval = interval
        self._wall = wall
        self._last: dict[str, _Reading] = {}
        self._last_t: float | None = None
        self._series: dict[str, _Series] = {}
        self._rates: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None

    # -- sampling -----------------------------------------------------------------

    def sample(self) -> None:
        """Take one reading: rates since the previous one, appended to each history."""
        now = self._wall()
        readings = read_families(self._metrics())
        elapsed = (now - self._last_t) if self._last_t is not None else 0.0
        rates: dict[str, dict[str, Any]] = {}
        for service, cur in readings.items():
            prev = self._last.get(service, _Reading())
            series = self._series.setdefault(service, _Series())
            calls = _delta(cur.calls, prev.calls)
            counted = sum(v for k, v in calls.items() if k not in CALLER_OUTCOMES)
            ok = sum(v for k, v in calls.items() if k in SUCCESS_OUTCOMES)
            series.bucket_deltas.append(_bucket_delta(cur.buckets, prev.buckets))
            window = _sum_buckets(series.bucket_deltas)
            p50, p99 = quantile(window, 0.5), quantile(window, 0.99)
            per = 1.0 / elapsed if elapsed > 0 else 0.0
            success = (ok / counted) if counted > 0 else None
            rates[service] = {
                "calls_per_second": counted * per,
                "success_rate": success,
                "p50_ms": None if p50 is None else p50 * 1000.0,
                "p99_ms": None if p99 is None else p99 * 1000.0,
                "retries_per_second": max(0.0, cur.retries - prev.retries) * per,
                "hedges_per_second": max(0.0, cur.hedges - prev.hedges) * per,
                "fallbacks_per_second": sum(_delta(cur.fallbacks, prev.fallbacks).values()) * per,
                "rejected_per_second": {
                    "limit": max(0.0, cur.rejections.get("limit", 0.0)
                                 - prev.rejections.get("limit", 0.0)) * per,
                    "concurrency": max(0.0, cur.rejections.get("concurrency", 0.0)
                                       - prev.rejections.get("concurrency", 0.0)) * per,
                },
                "failures_per_second": max(0.0, counted - ok) * per,
                "totals": {"calls": sum(cur.calls.values()), "retries": cur.retries,
                           "hedges": cur.hedges, "fallbacks": sum(cur.fallbacks.values()),
                           "rejections": sum(cur.rejections.values())},
            }
            if elapsed > 0:
                series.t.append(now)
                series.rps.append(counted * per)
                series.success.append(success)
                series.p50.append(rates[service]["p50_ms"])
                series.p99.append(rates[service]["p99_ms"])
        self._last, self._last_t, self._rates = readings, now, rates

    async def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - the dashboard must never take the sidecar down
                log.exception("dashboard sample failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        """Start sampling on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the document -------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        """`GET /dashboard.json`: every service of the running plan, troubled first."""
        state = self._state()
        services_state: dict[str, Any] = state.get("services") or {}
        rows = [self._service_row(name, svc or {}) for name, svc in services_state.items()]
        rows.sort(key=lambda r: (-r["trouble"], r["name"]))
        live = set(services_state)
        for gone in [s for s in self._series if s not in live and s != "_unknown"]:
            del self._series[gone]  # a reload removed it: forget its history
        sidecar = state.get("sidecar") or {}
        return {
            "version": 1,
            "generated_at": self._wall(),
            "interval": self.interval,
            "app": state.get("app_name") or sidecar.get("app"),
            "hash": sidecar.get("hash"),
            "draining": bool(sidecar.get("draining", False)),
            "reloads": sidecar.get("reloads"),
            "last_reload_failed": bool(sidecar.get("last_error", False)),
            "services": rows,
        }

    def _service_row(self, name: str, svc: dict[str, Any]) -> dict[str, Any]:
        rates = self._rates.get(name) or {
            "calls_per_second": 0.0, "success_rate": None, "p50_ms": None, "p99_ms": None,
            "retries_per_second": 0.0, "hedges_per_second": 0.0, "fallbacks_per_second": 0.0,
            "rejected_per_second": {"limit": 0.0, "concurrency": 0.0},
            "failures_per_second": 0.0,
            "totals": {"calls": 0.0, "retries": 0.0, "hedges": 0.0, "fallbacks": 0.0,
                       "rejections": 0.0},
        }
        shards_state: dict[str, Any] = svc.get("shards") or {}
        if shards_state:
            shards = [_shard_row(sname, s or {}) for sname, s in shards_state.items()]
        else:
            shards = [_shard_row(None, svc)]
        breakers = [s["breaker"]["state"] for s in shards if s["breaker"] is not None]
        worst_breaker = ("open" if "open" in breakers else
                         "half-open" if "half-open" in breakers else
                         "closed" if breakers else None)
        endpoints = [e for s in shards for e in s["endpoints"]]
        down = sum(1 for e in endpoints if not e["healthy"] or e["ejected"])
        success = rates["success_rate"]
        trouble = 0
        if worst_breaker == "open" or (endpoints and down == len(endpoints)):
            trouble = 3
        elif worst_breaker == "half-open" or (success is not None and success < 0.9):
            trouble = 2
        elif down or (success is not None and success < 0.99) or rates["fallbacks_per_second"] > 0:
            trouble = 1
        series = self._series.get(name)
        history: dict[str, list[Any]] = {"t": [], "rps": [], "success": [], "p50": [], "p99": []}
        if series is not None:
            history = {"t": list(series.t), "rps": list(series.rps),
                       "success": list(series.success), "p50": list(series.p50),
                       "p99": list(series.p99)}
        return {
            "name": name,
            "status": ("down", "degraded", "warning", "ok")[3 - trouble] if trouble else "ok",
            "trouble": trouble,
            "breaker": worst_breaker,
            **rates,
            "shards": shards,
            "sharded": bool(shards_state),
            "endpoints_down": down,
            "endpoints_total": len(endpoints),
            "history": history,
        }


def _shard_row(name: str | None, shard: dict[str, Any]) -> dict[str, Any]:
    breaker = shard.get("breaker")
    breaker_row = None
    if isinstance(breaker, dict):
        breaker_row = {"state": str(breaker.get("state", "closed")),
                       "retry_in": breaker.get("retry_in"),
                       "failures": breaker.get("failures")}
    endpoints = []
    for e in shard.get("endpoints") or []:
        if not isinstance(e, dict):
            continue
        endpoints.append({
            "url": e.get("url") or e.get("address"),
            "tier": e.get("tier", 0),
            "weight": e.get("weight", 1),
            "healthy": bool(e.get("healthy", True)),
            "ejected": bool(e.get("ejected", False)),
            # null: ejected, for how long not known (the page then says just "ejected")
            "ejected_for": e.get("ejected_for") if e.get("ejected") else 0.0,
            "in_flight": e.get("in_flight", 0),
        })
    return {"name": name, "breaker": breaker_row, "endpoints": endpoints}


__all__ = ["DashboardModel", "quantile", "read_families"]
