"""Envoy's admin API, read back as riprap's `/state` and `riprap_*` metrics.

Why: operators, dashboards and tests never care which engine runs, so the Envoy engine
answers `/state` in the Python engine's shape (service -> shard -> endpoints with health,
ejection, in-flight; breaker, limiter, bulkhead, budget, latency) and exports the same
metric names. Envoy knows most of it under its own names:

| riprap | Envoy |
|---|---|
| endpoint `healthy` / `ejected` / `in_flight` / `tier` / `weight` | `/clusters?format=json`: `failed_active_health_check`, `failed_outlier_check`, host `rq_active`, `priority`, `weight` |
| bulkhead (`concurrency N queue Q`) | the cluster's circuit-breaker thresholds; `upstream_rq_active`, `upstream_rq_pending_active`, `upstream_rq_pending_overflow` + `upstream_rq_active_overflow` |
| budget | `upstream_rq_retry_overflow`; calls, retries and allowed in the window from the upstream Lua filter's window (`/counters`' `window`) |
| breaker | the Lua filter's breakers (`GET /breakers` with Host `_riprap` on the listener); without them, `open` while every endpoint of the cluster is ejected |
| limiter | the local rate limit filter's `rate_limited` counter for the service |
| latency | the cluster's `upstream_rq_time` histogram (p50/p95/p99) |

A value Envoy does not keep is null, never invented. `/stats/prometheus` is read (the
histograms come with their buckets there), filtered to the statistics used here.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from dsl.plan import EndpointSpec, Plan, ServicePlan, ShardPlan
from sidecar.dashboard.model import quantile  # the one histogram_quantile estimate

log = logging.getLogger("riprap.envoy.admin")

ClusterName = Callable[[str, "str | None"], str]


@dataclass
class EnvoyStats:
    """One scrape of Envoy: samples by (metric name, frozen labels), and cluster hosts."""

    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)
    buckets: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)
    clusters: dict[str, dict[str, Any]] = field(default_factory=dict)
    breakers: dict[str, dict[str, Any]] | None = None  # the Lua filter's, by SERVICE[/SHARD]
    # the Lua filter's counters (`GET /counters`): fallback answers ("answered": service
    # -> kind -> n), stale copies ("stale": service -> entries, bytes, hits, misses) and
    # hedges sent ("hedges": service -> n) and calls over the limit ("limited": service -> n)
    counters: dict[str, dict[str, Any]] | None = None
    # ejections so far by (cluster, "ADDRESS:PORT"), from Envoy's outlier event log
    ejected: dict[tuple[str, str], int] | None = None
    # the hosts ejected now, by the same key: (wall-clock time of the ejection, Envoy's
    # `num_ejections`), from the same log (an UNEJECT event removes the host)
    ejected_since: dict[tuple[str, str], tuple[float, int]] | None = None

    def value(self, name: str, **labels: str) -> float:
        total = 0.0
        for lab, v in self.samples.get(name, ()):
            if all(lab.get(k) == want for k, want in labels.items()):
                total += v
        return total

    def has(self, name: str, **labels: str) -> bool:
        return any(all(lab.get(k) == want for k, want in labels.items())
                   for lab, _ in self.samples.get(name, ()))

    def cluster(self, name: str, metric: str, **labels: str) -> float:
        return self.value("envoy_cluster_" + metric, envoy_cluster_name=name, **labels)


_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str, stats: EnvoyStats | None = None) -> EnvoyStats:
    """Envoy's `/stats/prometheus` text: samples by name, histogram buckets apart.

    A small line parser rather than prometheus-client's (several times faster): riprap
    reads this once a second, and its own CPU must stay far below Envoy's. Counter names
    lose their `_total` suffix (Envoy adds it to counters only).
    """
    out = stats or EnvoyStats()
    counters: set[str] = set()
    for line in text.splitlines():
        if not line or line[0] == "#":
            if line.startswith("# TYPE ") and line.endswith(" counter"):
                counters.add(line[7:-8])
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, raw, value = m.group(1), m.group(2), m.group(3)
        try:
            v = float(value)
        except ValueError:
            continue
        labels = {k: bytes(val, "utf-8").decode("unicode_escape") if "\\" in val else val
                  for k, val in _LABEL.findall(raw)} if raw else {}
        if name.endswith("_bucket"):
            out.buckets.setdefault(name[:-7], []).append((labels, v))
        else:
            if name in counters and name.endswith("_total"):
                name = name[:-6]
            out.samples.setdefault(name, []).append((labels, v))
    return out


def parse_clusters(doc: dict[str, Any], stats: EnvoyStats) -> EnvoyStats:
    for c in doc.get("cluster_statuses", ()):
        stats.clusters[c.get("name", "")] = c
    return stats


def _host_key(host: dict[str, Any]) -> tuple[str, int]:
    sa = host.get("address", {}).get("socket_address", {})
    return str(sa.get("address", "")), int(sa.get("port_value", 0))


def _host_stat(host: dict[str, Any], name: str) -> int:
    for s in host.get("stats", ()):
        if s.get("name") == name:
            return int(s.get("value", 0) or 0)
    return 0


def _host_where(host: dict[str, Any]) -> str:
    """A host as the outlier event log names it (`upstream_url`)."""
    address, port = _host_key(host)
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _ejections(stats: EnvoyStats, cluster: str, host: dict[str, Any] | None) -> int | None:
    """How often the outlier detection ejected this host of `cluster` (None: not known)."""
    if stats.ejected is None or host is None:
        return None
    return stats.ejected.get((cluster, _host_where(host)), 0)


def _ejected_for(stats: EnvoyStats, spec: ServicePlan | ShardPlan, cluster: str,
                 host: dict[str, Any] | None, now: float) -> float | None:
    """Seconds until Envoy lets an ejected host back (None: not known), by Envoy's rule:
    `eject` times the host's ejections so far, at most the cluster's `max_ejection_time`
    (clusters.py: ten times `eject`, at least 300 s). Envoy readmits it at its next outlier
    sweep after that (at most a fifth of `eject`, capped at one second, later)."""
    if stats.ejected_since is None or host is None or spec.outlier is None:
        return None
    since = stats.ejected_since.get((cluster, _host_where(host)))
    if since is None:
        return None
    at, times = since
    eject = spec.outlier.eject
    length = min(eject * max(1, times), max(eject, 300.0, eject * 10))
    return round(max(0.0, at + length - now), 3)


def _endpoint_key(ep: EndpointSpec) -> tuple[str, int]:
    u = urlsplit(ep.url)
    port = u.port or (443 if u.scheme == "https" else 80)
    return (u.hostname or ""), port


def _match_host(ep: EndpointSpec, hosts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cluster hosts that are this endpoint (by address, or by resolved host name)."""
    want = _endpoint_key(ep)
    found = [h for h in hosts if _host_key(h) == want]
    if found:
        return found
    return [h for h in hosts if h.get("hostname", "").split(":")[0] == want[0]
            and _host_key(h)[1] == want[1]]


def _histogram(stats: EnvoyStats, name: str, **labels: str) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative buckets in seconds, count, sum in seconds) of an Envoy ms histogram."""
    by_bound: dict[float, float] = {}
    for lab, v in stats.buckets.get(name, ()):
        if all(lab.get(k) == want for k, want in labels.items()):
            le = lab.get("le", "+Inf")
            bound = math.inf if le in ("+Inf", "inf") else float(le) / 1000.0
            by_bound[bound] = by_bound.get(bound, 0.0) + v
    buckets = sorted(by_bound.items())
    count = stats.value(name + "_count", **labels)
    total = stats.value(name + "_sum", **labels) / 1000.0
    return buckets, count, total


class EnvoyState:
    """Builds the Python engine's `/state` shape from one Envoy scrape."""

    def __init__(self, cluster_name: ClusterName) -> None:
        self.cluster_name = cluster_name

    def snapshot(self, plan: Plan, stats: EnvoyStats) -> dict[str, Any]:
        services: dict[str, Any] = {}
        for name, svc in plan.services.items():
            data: dict[str, Any] = {"hosts": list(svc.hosts)}
            if svc.shards:
                data["limiter"] = self._limiter(svc, svc, stats)
                data["bulkhead"] = self._bulkhead(svc, [self.cluster_name(name, s.name)
                                                        for s in svc.shards], stats)
                data["budget"] = self._budget(svc, [self.cluster_name(name, s.name)
                                                    for s in svc.shards], stats)
                data["shards"] = {s.name: self._shard(svc, s, self.cluster_name(name, s.name), stats)
                                  for s in svc.shards}
            else:
                data.update(self._shard(svc, svc, self.cluster_name(name, None), stats))
            data["stale_cache"] = self._stale(svc, stats)
            services[name] = data
        return {"services": services}

    def _shard(self, svc: ServicePlan, spec: ServicePlan | ShardPlan, cluster: str,
               stats: EnvoyStats) -> dict[str, Any]:
        hosts = list(stats.clusters.get(cluster, {}).get("host_statuses", ()))
        endpoints = []
        now = time.time()
        for ep in spec.endpoints:
            matched: list[dict[str, Any] | None] = list(_match_host(ep, hosts))
            for h in matched or [None]:
                endpoint = self._endpoint(ep, h, _ejections(stats, cluster, h))
                if endpoint["ejected"]:
                    endpoint["ejected_for"] = _ejected_for(stats, spec, cluster, h, now)
                elif h is not None and stats.ejected_since is not None:
                    endpoint["ejected_for"] = 0.0  # as the Python engine: not ejected
                endpoints.append(endpoint)
        buckets, count, total = _histogram(stats, "envoy_cluster_upstream_rq_time",
                                           envoy_cluster_name=cluster)
        key = svc.name if spec is svc else f"{svc.name}/{spec.name}"
        return {
            "endpoints": endpoints,
            "breaker": self._breaker(spec, endpoints, stats.breakers, key),
            "limiter": self._limiter(svc, spec, stats) if not svc.shards else None,
            "bulkhead": self._bulkhead(spec, [cluster], stats) if not svc.shards else None,
            "budget": self._budget(spec, [cluster], stats) if not svc.shards else None,
            "latency": {"count": int(count), "total": round(total, 6),
                        "p50": quantile(buckets, 0.5), "p95": quantile(buckets, 0.95),
                        "p99": quantile(buckets, 0.99)},
        }

    @staticmethod
    def _stale(svc: ServicePlan, stats: EnvoyStats) -> Any:
        """The service's stale copies, as the Python engine's StaleCache.snapshot()."""
        specs: list[ServicePlan | ShardPlan] = [svc, *svc.shards]
        if not any(f.kind == "stale" for sp in specs for f in sp.fallbacks):
            return None
        if stats.counters is None:
            return None
        mine = (stats.counters.get("stale") or {}).get(svc.name) or {}
        return {"entries": int(mine.get("entries", 0)), "bytes": int(mine.get("bytes", 0)),
                "max_entries": mine.get("max_entries"), "max_bytes": mine.get("max_bytes"),
                "hits": int(mine.get("hits", 0)), "misses": int(mine.get("misses", 0))}

    @staticmethod
    def _endpoint(ep: EndpointSpec, host: dict[str, Any] | None,
                  ejections: int | None = None) -> dict[str, Any]:
        if host is None:  # not (yet) a host of the cluster: DNS pending, or a warming cluster
            return {"url": ep.url, "weight": ep.weight, "tier": ep.tier, "in_flight": 0,
                    "healthy": None, "ejected": False, "ejections": None, "ejected_for": None,
                    "consecutive_failures": None}
        hs = host.get("health_status", {})
        healthy = not (hs.get("failed_active_health_check") or hs.get("eds_health_status")
                       in ("UNHEALTHY", "DRAINING", "TIMEOUT"))
        out = {
            "url": ep.url,
            "weight": int(host.get("weight", ep.weight)),
            "tier": int(host.get("priority", ep.tier)),
            "in_flight": _host_stat(host, "rq_active"),
            "healthy": healthy,
            "ejected": bool(hs.get("failed_outlier_check")),
            "ejections": ejections,  # from the outlier event log (None: no outlier)
            "ejected_for": None,
            "consecutive_failures": None,
        }
        sa = host.get("address", {}).get("socket_address", {})
        if sa and urlsplit(ep.url).hostname != sa.get("address"):
            out["address"] = f"{sa.get('address')}:{sa.get('port_value')}"
        return out

    @staticmethod
    def _breaker(spec: ServicePlan | ShardPlan, endpoints: list[dict[str, Any]],
                 breakers: dict[str, dict[str, Any]] | None, key: str) -> Any:
        b = spec.breaker
        if b is None:
            return None
        if breakers is not None:  # the Lua filter keeps the breaker: its own state
            mine = breakers.get(key) or {}
            snap = {"state": mine.get("state", "closed"), "kind": b.kind,
                    "open_for": mine.get("open_for", b.open),
                    "retry_in": mine.get("retry_in", 0.0), "opened": mine.get("opened", 0),
                    "failures": mine.get("failures", 0)}
            if b.kind == "rate":
                snap["calls"] = mine.get("calls", 0)
            return snap
        live = [e for e in endpoints if e["healthy"] is not None]
        opened = bool(live) and all(e["ejected"] for e in live)
        return {"state": "open" if opened else "closed", "kind": b.kind, "open_for": b.open,
                "retry_in": None, "opened": None, "failures": None}

    @staticmethod
    def _limiter(svc: ServicePlan, spec: ServicePlan | ShardPlan, stats: EnvoyStats) -> Any:
        lim = spec.limit
        if lim is None:
            return None
        limited = 0.0
        over = (stats.counters or {}).get("limited")
        if isinstance(over, dict):  # the Lua filter's count per service (local limits)
            limited = float(over.get(svc.name, 0))
        for lab, v in stats.samples.get("envoy_http_local_rate_limit_rate_limited", ()):
            prefix = lab.get("envoy_local_http_ratelimit_prefix", "")
            if prefix == svc.name or prefix.endswith(f"_{svc.name}") or \
                    re.fullmatch(rf"(riprap[_.-])?{re.escape(svc.name)}([_.-]limit)?", prefix):
                limited += v
        snap: dict[str, Any] = {"rate": lim.rate, "burst": lim.burst, "limited": int(limited)}
        if lim.per_header:
            snap.update({"per_header": lim.per_header, "keys": None, "max_keys": lim.max_keys})
        else:
            snap["tokens"] = None
        return snap

    @staticmethod
    def _bulkhead(spec: ServicePlan | ShardPlan, clusters: Iterable[str], stats: EnvoyStats) -> Any:
        c = spec.concurrency
        if c is None:
            return None
        names = list(clusters)
        return {
            "max": c.max,
            "in_flight": int(sum(stats.cluster(n, "upstream_rq_active") for n in names)),
            "queued": int(sum(stats.cluster(n, "upstream_rq_pending_active") for n in names)),
            "queue": c.queue,
            "queue_timeout": c.queue_timeout,
            "rejected": int(sum(_overflow(stats, n) for n in names)),
            "timed_out": None,
        }

    @staticmethod
    def _budget(spec: ServicePlan | ShardPlan, clusters: Iterable[str], stats: EnvoyStats) -> Any:
        r = spec.retry
        if r is None or r.budget is None:
            return None
        names = list(clusters)
        window = _budget_window(stats, names)
        calls: int | None = None
        allowed: float | None = None
        retries = int(sum(stats.cluster(n, "upstream_rq_retry") for n in names))
        if window is not None:  # the upstream Lua filter's window, as policies/budget.py's
            calls, retries = window
            allowed = max(r.budget.ratio * calls, r.budget.min_per_second * r.budget.window)
        return {
            "ratio": r.budget.ratio,
            "min_per_second": r.budget.min_per_second,
            "window": r.budget.window,
            "calls": calls,
            "retries": retries,
            "allowed": allowed,
            "refused": int(sum(stats.cluster(n, "upstream_rq_retry_overflow") for n in names)
                           + _lua_refused(stats, spec.name if isinstance(spec, ServicePlan) else None)),
        }


def _budget_window(stats: EnvoyStats, clusters: list[str]) -> tuple[int, int] | None:
    """(calls, retries) in the retry budget's window now, from the Lua filter's `/counters`
    ("window": cluster -> [calls, retries]); a sharded service's shards summed. None
    without counters; zeros before the first budgeted call."""
    if stats.counters is None:
        return None
    seen = stats.counters.get("window")
    if not isinstance(seen, dict):
        return None
    calls = retries = 0
    for key, pair in seen.items():
        if key in clusters and isinstance(pair, list) and len(pair) == 2:
            calls, retries = calls + int(pair[0]), retries + int(pair[1])
    return calls, retries


def _lua_refused(stats: EnvoyStats, service: str | None) -> float:
    """Retries the upstream Lua filter's budget window refused for `service` (counted per
    service by the Lua filter's `/counters`); 0 for a shard, or without counters."""
    if service is None or stats.counters is None:
        return 0.0
    return float((stats.counters.get("refused") or {}).get(service) or 0)


def _overflow(stats: EnvoyStats, cluster: str) -> float:
    """Calls the bulkhead refused: over the queue (`upstream_rq_pending_overflow`) or, with
    no queue, over `max_requests` (`upstream_rq_active_overflow`: Envoy counts it apart)."""
    return stats.cluster(cluster, "upstream_rq_pending_overflow") + \
        stats.cluster(cluster, "upstream_rq_active_overflow")


def service_clusters(plan: Plan, cluster_name: ClusterName) -> dict[str, tuple[str, str | None]]:
    """cluster name -> (service, shard) for every cluster the plan's services use."""
    out: dict[str, tuple[str, str | None]] = {}
    for name, svc in plan.services.items():
        if svc.shards:
            for s in svc.shards:
                out[cluster_name(name, s.name)] = (name, s.name)
        else:
            out[cluster_name(name, None)] = (name, None)
    return out




def _rows(buckets: list[tuple[float, float]], total: float,
          bounds: tuple[float, ...]) -> list[float]:
    """Envoy's cumulative buckets as riprap's histogram row (per-bucket counts, then sum)."""
    row = [0.0] * (len(bounds) + 2)
    prev = 0.0
    cum = {round(b, 6): c for b, c in buckets}
    for i, b in enumerate(bounds):
        c = cum.get(round(b, 6), prev)
        row[i] = max(0.0, c - prev)
        prev = max(prev, c)
    last = buckets[-1][1] if buckets else prev
    row[len(bounds)] = max(0.0, last - prev)
    row[-1] = total
    return row


def fill_metrics(metrics: Any, plan: Plan, stats: EnvoyStats, state: dict[str, Any],
                 cluster_name: ClusterName) -> None:
    """Set the `riprap_*` series of `metrics` (a SidecarMetrics) from one Envoy scrape.

    Envoy's counters are cumulative since Envoy started, so the series are *set*, not
    incremented; a restarted Envoy starts them over, which Prometheus reads as a reset.
    """
    for m in (metrics.attempts, metrics.retries, metrics.retries_refused, metrics.ejections,
              metrics.rejections, metrics.calls, metrics.hedges, metrics.fallbacks,
              metrics.breaker_transitions):
        m.values.clear()
    metrics.upstream_latency.data.clear()
    metrics.call_duration.data.clear()
    _fill_calls(metrics, plan, stats)
    clusters = service_clusters(plan, cluster_name)
    by_service: dict[str, list[str]] = {}
    for cname, (svc, _shard) in clusters.items():
        by_service.setdefault(svc, []).append(cname)
    for svc_name, names in by_service.items():
        sp = plan.services[svc_name]
        retries = sum(stats.cluster(n, "upstream_rq_retry") for n in names)
        specs: list[ServicePlan | ShardPlan] = [sp, *sp.shards]
        if any(s.hedge is not None for s in specs) and stats.counters is not None:
            # Envoy counts a hedge as a retry: the Lua filter tells them apart
            hedges = float(((stats.counters.get("hedges") or {}).get(svc_name)) or 0)
            metrics.hedges.values[(svc_name,)] = hedges
            retries = max(0.0, retries - hedges)
        metrics.retries.values[(svc_name,)] = retries
        overflow = sum(stats.cluster(n, "upstream_rq_retry_overflow") for n in names) + \
            _lua_refused(stats, svc_name)
        if overflow or (sp.retry is not None and sp.retry.budget is not None):
            metrics.retries_refused.values[(svc_name, "budget")] = overflow
        if stats.ejected is None:  # no event log: Envoy's count per cluster
            ejections = sum(stats.cluster(n, "outlier_detection_ejections_enforced") for n in names)
            if ejections or sp.outlier is not None:
                metrics.ejections.values[(svc_name, "")] = ejections
        pending = sum(_overflow(stats, n) for n in names)
        if pending or sp.concurrency is not None:
            metrics.rejections.values[(svc_name, "concurrency")] = pending
        _overloaded_calls(metrics, svc_name, pending)
        rows: list[float] | None = None
        for n in names:
            buckets, _count, total = _histogram(stats, "envoy_cluster_upstream_rq_time",
                                                envoy_cluster_name=n)
            if not buckets:
                continue
            row = _rows(buckets, total, metrics.upstream_latency.bounds)
            rows = row if rows is None else [a + b for a, b in zip(rows, row, strict=True)]
        if rows is not None:
            metrics.upstream_latency.data[(svc_name,)] = rows
    for svc_name, data in state.get("services", {}).items():
        lim = data.get("limiter")
        if lim is not None:
            limited = float(lim.get("limited") or 0)
            metrics.rejections.values[(svc_name, "limit")] = limited
            if limited:  # answered before the router: not in its per-route counts
                metrics.calls.values[(svc_name, "rate-limited")] = limited
        shards = data.get("shards") or {None: data}
        for shard, sd in shards.items():
            br = sd.get("breaker")
            if br is not None:
                metrics.breaker_state.values[(svc_name, shard or "")] = \
                    {"closed": 0.0, "half-open": 1.0, "open": 2.0}.get(br["state"], -1.0)
                lua = (stats.breakers or {}).get(svc_name if shard is None else f"{svc_name}/{shard}")
                for new_state, field_name in (("open", "opened"), ("half-open", "half_opened"),
                                              ("closed", "closed")):
                    count = float((lua or {}).get(field_name, 0))
                    if count:  # as the Python engine: a series from its first transition
                        metrics.breaker_transitions.values[(svc_name, shard or "", new_state)] = count
    answered = (stats.counters or {}).get("answered") or {}
    for svc_name, kinds in answered.items():
        if svc_name in plan.services and isinstance(kinds, dict):
            for kind, count in kinds.items():
                metrics.fallbacks.values[(svc_name, kind)] = float(count)
    for cname, status in stats.clusters.items():
        owner = clusters.get(cname)
        if owner is None:
            continue
        svc_name, shard_name = owner
        owner_plan = plan.services[svc_name]
        spec: ServicePlan | ShardPlan = owner_plan
        if shard_name is not None:
            spec = next(s for s in owner_plan.shards if s.name == shard_name)
        hosts = list(status.get("host_statuses", ()))
        for ep in spec.endpoints:
            for h in _match_host(ep, hosts):
                for outcome, stat in (("ok", "rq_success"), ("5xx", "rq_error"),
                                      ("timeout", "rq_timeout"),
                                      ("connect-failure", "cx_connect_fail")):
                    key = (svc_name, ep.url, outcome)
                    metrics.attempts.values[key] = metrics.attempts.values.get(key, 0.0) + \
                        _host_stat(h, stat)
                ejected = _ejections(stats, cname, h)
                if ejected:  # as the Python engine: a series from an endpoint's first ejection
                    key2 = (svc_name, ep.url)
                    metrics.ejections.values[key2] = metrics.ejections.values.get(key2, 0.0) + ejected
                if spec.health is not None:
                    hs = h.get("health_status", {})
                    metrics.endpoint_healthy.values[(svc_name, ep.url)] = \
                        0.0 if hs.get("failed_active_health_check") else 1.0


def _overloaded_calls(metrics: Any, service: str, refused: float) -> None:
    """The bulkhead's refusals as calls with outcome `overloaded`, as the Python engine
    counts them: Envoy's per-route counters saw the router's own 503 as a 5xx, so they
    move from `upstream-5xx` (never more than were counted there)."""
    five = metrics.calls.values.get((service, "upstream-5xx"), 0.0)
    moved = min(refused, five)
    if moved <= 0:
        return
    if five - moved > 0:
        metrics.calls.values[(service, "upstream-5xx")] = five - moved
    else:
        del metrics.calls.values[(service, "upstream-5xx")]
    metrics.calls.values[(service, "overloaded")] = moved


_CLASS_OUTCOME = {"1": "ok", "2": "ok", "3": "ok", "4": "upstream-4xx", "5": "upstream-5xx"}


def _fill_calls(metrics: Any, plan: Plan, stats: EnvoyStats) -> None:
    """Calls per service from Envoy's per-route counters (each route's `stat_prefix` names
    its service: `reload.split_routes`). An answer Envoy made itself (a fallback, 503
    with no healthy endpoint, a 504 timeout) counts by its status class."""
    from sidecar.engines.envoy.reload import stat_name

    prefixes: dict[str, str] = {}
    for name in plan.services:
        prefixes.setdefault(stat_name(name), name)
    for lab, v in stats.samples.get("envoy_vhost_route_upstream_rq_xx", ()):
        service = prefixes.get(lab.get("envoy_route", ""))
        outcome = _CLASS_OUTCOME.get(lab.get("envoy_response_code_class", ""))
        if service is None or outcome is None:
            continue
        key = (service, outcome)
        metrics.calls.values[key] = metrics.calls.values.get(key, 0.0) + v
    for prefix, service in prefixes.items():
        buckets, _count, total = _histogram(stats, "envoy_vhost_route_upstream_rq_time",
                                            envoy_route=prefix)
        if buckets:
            row = _rows(buckets, total, metrics.call_duration.bounds)
            old = metrics.call_duration.data.get((service,))
            metrics.call_duration.data[(service,)] = row if old is None else \
                [a + b for a, b in zip(old, row, strict=True)]
