"""Clusters: one per service, or one per shard, with its endpoints and the per-cluster policies.

- failover tiers are Envoy priorities; a huge overprovisioning factor makes a tier take
  all traffic while it has one healthy host, so no call spills to the next tier early;
- `balance` is the lb policy (least-request is power of two choices), weights per endpoint;
- `health` is an active HTTP health check, `outlier` outlier detection;
- `concurrency`/`queue` and the retry `budget` are circuit-breaker thresholds;
- `tls` is an UpstreamTlsContext whose secrets come from watched SDS files (rotation);
- `resolve` makes a STRICT_DNS cluster re-resolved every D, through the plan's `resolver`.
"""

from __future__ import annotations

import math
import os
from typing import Any

from dsl.plan import Plan, TlsSpec
from sidecar.engines.envoy.names import RATELIMIT_CLUSTER, SELF_CLUSTER
from sidecar.engines.envoy.notes import NoteSink
from sidecar.engines.envoy.units import (
    PRESERVE_CASE,
    Target,
    Unit,
    all_units,
    duration,
    is_ip,
    resends,
    retries_resets,
    target,
    uses_service_fallback,
)

HUGE = 1_000_000_000  # "no limit" for Envoy's circuit breakers (its defaults are 1024 and 3 retries)
OVERPROVISIONING = 100_000  # a tier with any healthy host takes 100 % of the load
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
TLS_SECRET_FILE = "sds-{name}.yaml"
PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
QUEUE_DIFFERS = ("a queued call waits until a slot frees or its timeout, not at most queue-timeout; "
                 "a call waiting for a new upstream connection to open takes a queue place")
BUDGET_DIFFERS = ("retries after an answer are budgeted as riprap does (P% of calls over the window, "
                  "at least R per second), in each Envoy worker; resends after a connect failure or a "
                  "reset, and hedge copies, count in that window but are capped only by Envoy's "
                  "in-flight retry budget (P% of requests in flight, at least R at once)")
LB = {"round-robin": "ROUND_ROBIN", "least-request": "LEAST_REQUEST", "random": "RANDOM"}
LUA_HEAD_KB, LUA_HEADERS = 1024, 4096  # the codec's answer-head bounds where Lua checks riprap's


def _status_ranges(expect: tuple[str, ...]) -> list[dict[str, int]]:
    ranges = []
    for item in expect:
        if item.endswith("xx"):
            start = int(item[0]) * 100
            ranges.append({"start": start, "end": start + 100})
        else:
            code = int(item)
            ranges.append({"start": code, "end": code + 1})
    return ranges


def _other_statuses(expected: list[dict[str, int]]) -> list[dict[str, int]]:
    """Every status in 100..599 outside `expected`, as ranges: Envoy's `retriable_statuses`,
    without which one unexpected status marks an endpoint unhealthy at once, whatever `fall`."""
    ok = [False] * 600
    for r in expected:
        for code in range(max(100, r["start"]), min(600, r["end"])):
            ok[code] = True
    out: list[dict[str, int]] = []
    for code in range(100, 600):
        if ok[code]:
            continue
        if out and out[-1]["end"] == code:
            out[-1]["end"] = code + 1
        else:
            out.append({"start": code, "end": code + 1})
    return out


def _health_checks(unit: Unit) -> list[dict[str, Any]]:
    h = unit.spec.health
    if h is None:
        return []
    return [
        {
            "timeout": duration(h.timeout),
            "interval": duration(h.interval),
            "no_traffic_interval": duration(h.interval),
            "unhealthy_threshold": h.fall,
            "healthy_threshold": h.rise,
            "http_health_check": {
                "path": h.path,
                "method": h.method.upper(),
                "expected_statuses": _status_ranges(h.expect),
                "retriable_statuses": _other_statuses(_status_ranges(h.expect)),
                "request_headers_to_add": [
                    {
                        "header": {"key": "user-agent", "value": "riprap-health"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ],
            },
        }
    ]


def _outlier(unit: Unit, sink: NoteSink) -> dict[str, Any] | None:
    spec = unit.spec
    o = spec.outlier
    if o is None:
        return None
    tiers = {e.tier for e in spec.endpoints}
    if len(tiers) > 1 and o.max_fraction < 1.0:
        sink.add(unit.service.name, "outlier",
                 "the max % of ejected endpoints counts the whole cluster, not each tier")
    sink.add(unit.service.name, "outlier",
             "the ejection multiplier goes down again by one for every sweep an endpoint stays in")
    return {
        # Envoy returns ejected endpoints on these sweeps: often enough that an ejection
        # lasts D times the count, give or take a fifth of D
        "interval": duration(max(0.05, min(1.0, o.eject / 5))),
        "consecutive_5xx": o.failures,
        "enforcing_consecutive_5xx": 100,
        "consecutive_gateway_failure": HUGE,
        "enforcing_consecutive_gateway_failure": 0,
        "enforcing_success_rate": 0,
        "base_ejection_time": duration(o.eject),
        "max_ejection_time": duration(max(300.0, o.eject * 10)),
        "max_ejection_percent": max(0, min(100, math.floor(o.max_fraction * 100))),
    }


def _thresholds(unit: Unit, sink: NoteSink) -> dict[str, Any]:
    spec = unit.spec
    t: dict[str, Any] = {
        "priority": "DEFAULT",
        "max_connections": HUGE,
        "max_pending_requests": HUGE,
        "max_requests": HUGE,
        "max_retries": HUGE,
        "track_remaining": True,
    }
    c = spec.concurrency
    if c is not None:
        if c.queue == 0:
            # at most N streams attached to connections; the next one overflows (503) as
            # soon as its connection is up: no call waits
            t["max_requests"] = c.max
            sink.add(unit.service.name, "concurrency",
                     "Envoy's circuit breakers: a call over the cap gets its 503 once its upstream "
                     "connection is open, not before")
        else:
            # N connections (HTTP/1.1: one call each); calls wait for one in Envoy's pending
            # queue, Q long: once the N connections are up, N in flight, Q waiting, the rest
            # 503 at once. A call waiting for a connection still opening waits there too.
            t["max_connections"] = c.max
            t["max_pending_requests"] = c.queue
            t["max_requests"] = c.max
            sink.add(unit.service.name, "concurrency queue", QUEUE_DIFFERS)
    r = spec.retry
    if r is not None and r.budget is not None:
        t["retry_budget"] = {
            "budget_percent": {"value": round(r.budget.ratio * 100, 3)},
            "min_retry_concurrency": max(1, math.ceil(r.budget.min_per_second)),
        }
        sink.add(unit.service.name, "retry budget", BUDGET_DIFFERS)
    return t


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _load_assignment(unit: Unit) -> dict[str, Any]:
    tiers = sorted({e.tier for e in unit.spec.endpoints})
    priority = {tier: i for i, tier in enumerate(tiers)}
    groups: dict[int, list[dict[str, Any]]] = {}
    for e in unit.spec.endpoints:
        t = target(e)
        groups.setdefault(priority[e.tier], []).append(
            {
                "endpoint": {
                    "address": _socket_address(t.host, t.port),
                    "hostname": t.authority,
                    "health_check_config": {"hostname": t.authority},
                },
                "load_balancing_weight": e.weight,
            }
        )
    return {
        "cluster_name": unit.cluster,
        "endpoints": [{"priority": p, "lb_endpoints": groups[p]} for p in sorted(groups)],
        "policy": {"overprovisioning_factor": OVERPROVISIONING},
    }


def _dns(plan: Plan, unit: Unit, targets: list[Target]) -> dict[str, Any]:
    """STRICT_DNS settings when an endpoint is a name; {} when every endpoint is an address."""
    spec = unit.spec
    if all(is_ip(t.host) for t in targets):
        return {"type": "STATIC"}
    refresh = [e.resolve for e in spec.endpoints if e.resolve is not None]
    out: dict[str, Any] = {
        "type": "STRICT_DNS",
        "dns_lookup_family": "ALL" if refresh else "V4_PREFERRED",
        "dns_refresh_rate": duration(min(refresh) if refresh else 5.0),
        "respect_dns_ttl": False,
    }
    if plan.resolver:
        resolvers = []
        for addr in plan.resolver:
            host, _, port = addr.rpartition(":")
            resolvers.append(_socket_address(host.strip("[]"), int(port)))
        out["typed_dns_resolver_config"] = {
            "name": "envoy.network.dns_resolver.cares",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
                "resolvers": resolvers,
                "use_resolvers_as_fallback": False,
                "dns_resolver_options": {"use_tcp_for_dns_lookups": False, "no_default_search_domain": True},
            },
        }
    return out


def secret_file(cluster: str, kind: str) -> str:
    safe = cluster.replace("/", "--")
    return TLS_SECRET_FILE.format(name=f"{safe}-{kind}")


def _sds(name: str, path: str) -> dict[str, Any]:
    return {
        "name": name,
        "sds_config": {
            "path_config_source": {"path": path, "watched_directory": {"path": os.path.dirname(path)}},
            "resource_api_version": "V3",
        },
    }


def _tls(unit: Unit, targets: list[Target], dynamic_dir: str,
         secrets: dict[str, dict[str, Any]], sink: NoteSink) -> dict[str, Any] | None:
    schemes = {t.scheme for t in targets}
    if "https" not in schemes:
        return None
    if len(schemes) > 1:
        sink.add(unit.service.name, "endpoint",
                 "http:// and https:// endpoints mixed in one tier list: Envoy calls all of them with TLS")
    tls = unit.spec.tls or TlsSpec()
    hosts = {t.host for t in targets}
    sni = tls.sni or (next(iter(hosts)) if len(hosts) == 1 else None)
    common: dict[str, Any] = {}
    if tls.cert and tls.key:
        name = f"{unit.cluster}/cert"
        fname = secret_file(unit.cluster, "cert")
        secrets[fname] = {"resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": name,
            "tls_certificate": {
                "certificate_chain": {"filename": tls.cert},
                "private_key": {"filename": tls.key},
                "watched_directory": {"path": os.path.dirname(tls.cert)},
            },
        }]}
        common["tls_certificate_sds_secret_configs"] = [_sds(name, os.path.join(dynamic_dir, fname))]
    if tls.verify:
        name = f"{unit.cluster}/ca"
        fname = secret_file(unit.cluster, "ca")
        ca = tls.ca or SYSTEM_CA
        validation: dict[str, Any] = {"trusted_ca": {"filename": ca}, "watched_directory": {"path": os.path.dirname(ca)}}
        if sni is not None:
            san = "IP_ADDRESS" if is_ip(sni) else "DNS"
            validation["match_typed_subject_alt_names"] = [{"san_type": san, "matcher": {"exact": sni}}]
        secrets[fname] = {"resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": name,
            "validation_context": validation,
        }]}
        common["validation_context_sds_secret_config"] = _sds(name, os.path.join(dynamic_dir, fname))
    ctx: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": common,
    }
    if sni is not None and not is_ip(sni):
        ctx["sni"] = sni
    return {"name": "envoy.transport_sockets.tls", "typed_config": ctx}


def _auto_sni(unit: Unit, targets: list[Target]) -> dict[str, bool] | None:
    """Endpoints with several host names and no `sni`: SNI (and the name checked) per call,
    from the Host Envoy sends, which is the endpoint's own name."""
    tls = unit.spec.tls or TlsSpec()
    names = {t.host for t in targets if t.scheme == "https" and not is_ip(t.host)}
    if tls.sni is not None or len(names) < 2:
        return None
    return {"auto_sni": True, "auto_san_validation": tls.verify}


def _protocol_options(auto_sni: dict[str, bool] | None, lua_bounds: bool) -> dict[str, Any]:
    """HTTP/1.1 upstream, riprap's bounds on the upstream's answer head. With `lua_bounds`
    (the unit retries resets, and Envoy would retry a head over its codec's bounds like
    one) the codec takes heads up to LUA_HEAD_KB and the Lua filter answers those over
    riprap's bounds 502, not retried."""
    count, kb = (LUA_HEADERS, LUA_HEAD_KB) if lua_bounds else (256, 64)
    opts: dict[str, Any] = {
        "@type": f"type.googleapis.com/{PROTOCOL_OPTIONS}",
        "explicit_http_config": {"http_protocol_options": {"header_key_format": PRESERVE_CASE}},
        # an upstream answer with a head over riprap's bounds is a 502, as on the python engine
        "common_http_protocol_options": {"max_headers_count": count, "idle_timeout": "60s",
                                         "max_response_headers_kb": kb},
    }
    if auto_sni is not None:
        opts["upstream_http_protocol_options"] = auto_sni
    return opts


def _cluster(plan: Plan, unit: Unit, dynamic_dir: str, secrets: dict[str, dict[str, Any]],
             sink: NoteSink) -> dict[str, Any]:
    spec = unit.spec
    targets = [target(e) for e in spec.endpoints]
    cluster: dict[str, Any] = {
        "name": unit.cluster,
        "connect_timeout": duration(min(spec.timeout, 5.0)),
        **_dns(plan, unit, targets),
        "lb_policy": LB[spec.balance],
        "load_assignment": _load_assignment(unit),
        "circuit_breakers": {"thresholds": [_thresholds(unit, sink)]},
        "per_connection_buffer_limit_bytes": 1024 * 1024,
    }
    if spec.balance == "least-request":
        cluster["least_request_lb_config"] = {"choice_count": 2}
    # No panic routing: a cluster with no healthy host answers 503 `no-healthy-endpoint` at
    # once (or its fallback does), never calls an unhealthy endpoint. No update merge window
    # (Envoy's default is 1 s): a health change reaches the load balancer at once, so `rise`
    # and `fall` take effect after exactly that many checks.
    cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}, "update_merge_window": "0s"}
    checks = _health_checks(unit)
    if checks:
        cluster["health_checks"] = checks
        sink.add(unit.service.name, "health",
                 "Envoy counts an endpoint healthy only after its first passing check (riprap starts it healthy)")
    outlier = _outlier(unit, sink)
    if outlier is not None:
        cluster["outlier_detection"] = outlier
    tls = _tls(unit, targets, dynamic_dir, secrets, sink)
    if tls is not None:
        cluster["transport_socket"] = tls
    auto_sni = _auto_sni(unit, targets) if tls is not None else None
    cluster["typed_extension_protocol_options"] = {
        PROTOCOL_OPTIONS: _protocol_options(auto_sni, retries_resets(unit))}
    return cluster


def ratelimit_cluster(port: int) -> dict[str, Any]:
    """riprap's gRPC rate limit service (shared limits) on 127.0.0.1:port, over HTTP/2."""
    return {
        "name": RATELIMIT_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "load_assignment": {
            "cluster_name": RATELIMIT_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address("127.0.0.1", port)}}]}],
        },
        "typed_extension_protocol_options": {
            PROTOCOL_OPTIONS: {
                "@type": f"type.googleapis.com/{PROTOCOL_OPTIONS}",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }


def self_cluster(listen_host: str, listen_port: int) -> dict[str, Any]:
    """Envoy's own listener, for `fallback service`: the Lua filter resends a failed call
    there with the other service's name as Host, so that service's whole policy applies;
    and for the upstream Lua filter's waits between attempts (`Host: _riprap`, `/sleep`)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen_host, listen_host)
    return {
        "name": SELF_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": SELF_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(host, listen_port)}}]}],
        },
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_connections": HUGE,
                                             "max_pending_requests": HUGE, "max_requests": HUGE,
                                             "max_retries": 0}]},
    }


def build_clusters(plan: Plan, listen: tuple[str, int], ratelimit_port: int | None, dynamic_dir: str,
                   sink: NoteSink) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every cluster of the plan, and the SDS secret files they name (file name -> content)."""
    secrets: dict[str, dict[str, Any]] = {}
    clusters = [_cluster(plan, unit, dynamic_dir, secrets, sink) for unit in all_units(plan)]
    if uses_service_fallback(plan) or resends(plan):
        clusters.append(self_cluster(*listen))
    if ratelimit_port is not None and any(
        u.spec.limit is not None and u.spec.limit.shared for u in all_units(plan)
    ):
        clusters.append(ratelimit_cluster(ratelimit_port))
    return clusters, secrets


__all__ = ["build_clusters", "duration", "secret_file"]
