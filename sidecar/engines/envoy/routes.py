"""The route table: one virtual host per service (its name and `host` aliases, any port),
and a catch-all one for `/NAME/rest` (prefix removed) and the unknown-service 404.

Each route carries the per-call policies Envoy keeps on routes: the timeout, the retry
policy (retry_on, retriable status codes, per-try timeout, backoff, Retry-After as a
rate-limited backoff, a different host and tier on retry), hedging, rate limit
descriptors, chaos faults. Its metadata tells the Lua filter (lua/riprap.lua) the rest:
the service, its timeout (an incoming `x-riprap-deadline-ms` caps it), the shard pick and
the static fallback.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from typing import Any

from dsl.plan import IDEMPOTENT_METHODS, BreakerSpec, ChaosSpec, Plan, RetrySpec
from sidecar.engines.envoy.notes import NoteSink
from sidecar.engines.envoy.units import Unit, duration, resends, retries_resets, target, units_of

LUA = "envoy.filters.http.lua"
LUA_META = "filter_metadata"
LOCAL_RATELIMIT = "envoy.filters.http.local_ratelimit"
FAULT = "envoy.filters.http.fault"
DELAY = "riprap.delay"  # a fault filter that only the `/sleep` route enables (listeners.py)
SHARD_HEADER = "x-riprap-shard"
# set by the Lua filter on a forward-proxy (absolute-form) call to a host the plan does not
# name; the catch-all virtual host's first route answers it 403
FORWARD_PROXY_HEADER = "x-riprap-forward-proxy"
# hop-by-hop headers Envoy itself forwards (it drops Connection, Keep-Alive, Upgrade
# without a tunnel, Transfer-Encoding and the headers Connection names)
HOP_BY_HOP_REQUEST = ["te", "trailer", "proxy-authorization", "proxy-connection"]
HOP_BY_HOP_RESPONSE = ["trailer", "proxy-authenticate", "proxy-connection"]
STATE_HOST = "_riprap"  # not a service name (those start with a letter)
LOCAL_STAGE = 0
SHARED_STAGE = 1
EXPECTED_TIMEOUT = "x-envoy-expected-rq-timeout-ms"
# the time left for this attempt, as Envoy computes it (route timeout, capped by an
# incoming x-riprap-deadline-ms through the Lua filter)
DEADLINE = {
    "header": {"key": "x-riprap-deadline-ms", "value": f"%REQ({EXPECTED_TIMEOUT})%"},
    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
}
RETRY_HEADER = "x-riprap-retry"  # the upstream Lua filter's mark on an answer to resend
RETRY_AFTER_HEADER = "x-riprap-retry-after"  # its Retry-After in seconds, where Envoy waits
ATTEMPTS = {
    "header": {"key": "x-riprap-attempts", "value": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"},
    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
}


def _codes(on: tuple[str, ...]) -> list[int]:
    codes: set[int] = set()
    for cond in on:
        if cond.endswith("xx"):
            base = int(cond[0]) * 100
            codes.update(range(base, base + 100))
        elif cond.isdigit():
            codes.add(int(cond))
    return sorted(codes)


def _retry_on(r: RetrySpec, service: str, sink: NoteSink) -> list[str]:
    on: list[str] = []
    if "connect-failure" in r.on:
        on.append("connect-failure")
    if "reset" in r.on or "timeout" in r.on:
        on.append("reset")
        if "reset" not in r.on:
            sink.add(service, "retry", "Envoy retries a per-try timeout as a `reset`: resets are retried too")
        elif "timeout" not in r.on and r.per_try_timeout is not None:
            sink.add(service, "retry", "Envoy's `reset` also retries a per-try timeout")
    return on


def _retry_policy(unit: Unit, r: RetrySpec | None, *, safe: bool, hedge_extra: int,
                  sink: NoteSink) -> dict[str, Any] | None:
    """Envoy's retry policy for `r`. `safe`: the request may be sent twice (idempotent).

    Envoy resends on a connect failure or a reset by itself; which answers are resent, and
    how long to wait first, the upstream Lua filter decides per attempt (lua/riprap_upstream.lua,
    from `tries_meta`): it marks an answer to resend with `x-riprap-retry`."""
    service = unit.service.name
    retries = r.retries if r is not None else 0
    on: list[str] = []
    if r is not None:
        if safe:
            on = _retry_on(r, service, sink)
        elif "connect-failure" in r.on:
            on = ["connect-failure"]
    if not on and not (safe and r is not None and _codes(r.on)):
        retries = 0
    extra = hedge_extra if safe else 0
    if retries + extra == 0:
        return None
    if safe:
        on.append("retriable-headers")
    policy: dict[str, Any] = {
        "retry_on": ",".join(on),
        "num_retries": retries + extra,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        # least-request picks two at random: enough re-picks that a retry lands elsewhere
        "host_selection_retry_max_attempts": 32,
        # the upstream Lua filter waits the backoff (or Retry-After); Envoy's is 1 ms
        "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.001s"},
    }
    if envoy_waits(r, extra):
        _envoy_backoff(policy, unit, r, sink)
    if safe:
        policy["retriable_headers"] = [{"name": RETRY_HEADER, "present_match": True}]
    if r is not None and r.per_try_timeout is not None:
        policy["per_try_timeout"] = duration(r.per_try_timeout)
    tiers = sorted({e.tier for e in unit.spec.endpoints})
    if len(tiers) > 1:
        primaries = sum(1 for e in unit.spec.endpoints if e.tier == tiers[0])
        policy["retry_priority"] = {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                "update_frequency": max(1, primaries),
            },
        }
    return policy


def envoy_waits(r: RetrySpec | None, hedge_extra: int) -> bool:
    """Whether Envoy, not the upstream Lua filter, waits between attempts: on a route with a
    per-try timer (`per-try`, or a hedge), which Envoy starts with the attempt, so a wait in
    the attempt's filters would use it up."""
    return hedge_extra > 0 or (r is not None and r.per_try_timeout is not None)


def _envoy_backoff(policy: dict[str, Any], unit: Unit, r: RetrySpec | None, sink: NoteSink) -> None:
    if r is None:
        return
    if r.backoff is not None:
        b = r.backoff
        policy["retry_back_off"] = {"base_interval": duration(b.base), "max_interval": duration(max(b.max, b.base))}
    # a Retry-After the upstream Lua filter found within the deadline, in whole seconds
    policy["rate_limited_retry_back_off"] = {
        "reset_headers": [{"name": RETRY_AFTER_HEADER, "format": "SECONDS"}],
        "max_interval": duration(unit.spec.timeout),
    }
    sink.add(unit.service.name, "retry",
             "with a per-try time or a hedge, Envoy waits between attempts itself: a fully jittered "
             "backoff, and a Retry-After rounded up to whole seconds (plus up to half of it)")


def tries_meta(unit: Unit, r: RetrySpec | None, *, safe: bool, hedge_extra: int) -> dict[str, Any] | None:
    """What the upstream Lua filter needs of a route that may resend a call (its module
    docstring says how each is used), or None for one that never resends."""
    retries = r.retries if r is not None else 0
    codes = _codes(r.on) if r is not None and safe else []
    if r is None or not (safe or "connect-failure" in r.on):
        retries = 0
    extra = hedge_extra if safe else 0
    if retries + extra == 0:
        return None
    meta: dict[str, Any] = {"codes": codes, "retries": retries + extra, "hedge": extra > 0,
                            "latency_key": unit.cluster, "waits": not envoy_waits(r, extra)}
    if r is not None and r.budget is not None:
        # policies/budget.py's window, kept per Envoy worker by the upstream Lua filter
        meta["budget"] = {"ratio": r.budget.ratio, "floor": r.budget.min_per_second * r.budget.window,
                          "window_ms": r.budget.window * 1000}
    if r is not None and r.backoff is not None:
        b = r.backoff
        meta["backoff"] = {"kind": b.kind, "base_ms": b.base * 1000, "max_ms": max(b.max, b.base) * 1000,
                           "jitter": b.jitter}
    return meta


def _hedge(unit: Unit, sink: NoteSink) -> tuple[float | None, int]:
    """(hedge delay, extra copies) for the unit, or (None, 0)."""
    h = unit.spec.hedge
    if h is None:
        return None, 0
    if h.delay is not None:
        delay = h.delay
    else:
        delay = max(h.min_delay, h.initial_delay)  # the Lua filter sets the observed pNN per call
        sink.add(unit.service.name, "hedge",
                 "the percentile is of whole calls (not attempts), as each Envoy worker sees them")
    r = unit.spec.retry
    if r is not None and r.per_try_timeout is not None and abs(r.per_try_timeout - delay) > 1e-9:
        sink.add(unit.service.name, "hedge",
                 "Envoy hedges on the per-try timeout: the hedge delay replaces the retry's per-try time")
    return delay, h.max_extra


def _fallback_meta(plan: Plan, unit: Unit) -> list[dict[str, Any]]:
    """The fallback chain for the Lua filter, in order (lua/riprap.lua answers from it)."""
    links: list[dict[str, Any]] = []
    for fb in unit.spec.fallbacks:
        if fb.kind == "stale":
            links.append({"kind": "stale", "max_age_ms": max(1, round((fb.max_age or 0.0) * 1000))})
        elif fb.kind == "service" and fb.service is not None and fb.service in plan.services:
            target_svc = plan.services[fb.service]
            links.append({"kind": "service", "host": fb.service,
                          "timeout_ms": max(1, round(target_svc.timeout * 1000))})
        elif fb.kind == "static":
            links.append({"kind": "static", "status": fb.status, "body": fb.body or "",
                          "content_type": fb.content_type or "text/plain; charset=utf-8"})
    return links


def breaker_meta(b: BreakerSpec) -> dict[str, Any]:
    """The breaker spec for the Lua filter (times in ms); `id` changes with the spec, so a
    reload keeps a breaker's state only while its spec is the same."""
    spec: dict[str, Any] = {
        "kind": b.kind,
        "failures": b.failures or 1,
        "rate": b.rate if b.rate is not None else 1.0,
        "window": max(1, b.window),
        "min_calls": b.min_calls,
        "open_ms": b.open * 1000,
        "max_open_ms": b.max_open * 1000,
        "probes": max(1, b.probes),
    }
    if b.slow is not None:
        spec["slow_ms"] = b.slow * 1000
    spec["id"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return spec


def _fault(chaos: tuple[ChaosSpec, ...], service: str, sink: NoteSink) -> dict[str, Any]:
    cfg: dict[str, Any] = {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}
    aborts = [c for c in chaos if c.kind == "abort"]
    delays = [c for c in chaos if c.kind == "delay"]
    if len(aborts) > 1 or len(delays) > 1:
        sink.add(service, "chaos", "Envoy has one abort and one delay per route: the first of each is used")
    if aborts:
        a = aborts[0]
        cfg["abort"] = {"http_status": a.status or 503, "percentage": _fraction(a.probability)}
    if delays:
        d = delays[0]
        cfg["delay"] = {"fixed_delay": duration(d.delay or 0.0), "percentage": _fraction(d.probability)}
    sink.add(service, "chaos", "a fault is injected once per call, before retries, not on every attempt")
    return cfg


def _fraction(p: float) -> dict[str, Any]:
    return {"numerator": round(p * 1_000_000), "denominator": "MILLION"}


def _rate_limits(unit: Unit, plan: Plan, shared_ok: bool, sink: NoteSink) -> list[dict[str, Any]]:
    lim = unit.spec.limit
    if lim is None:
        return []
    actions: list[dict[str, Any]] = [
        {"generic_key": {"descriptor_key": "riprap_service", "descriptor_value": unit.service.name}}
    ]
    if lim.per_header:
        actions.append({"request_headers": {"header_name": lim.per_header.lower(), "descriptor_key": "riprap_key"}})
    shared = lim.shared and shared_ok
    if lim.shared and not shared_ok:
        sink.add(unit.service.name, "limit shared",
                 "no rate limit service was given to this configuration: the bucket is this Envoy's own")
    return [{"stage": SHARED_STAGE if shared else LOCAL_STAGE, "actions": actions}]


class RouteBuilder:
    def __init__(self, plan: Plan, sink: NoteSink, *, chaos: bool, shared_ok: bool) -> None:
        self.plan = plan
        self.sink = sink
        self.chaos = chaos
        self.shared_ok = shared_ok

    def _meta(self, unit: Unit, shard_meta: dict[str, Any] | None, strip: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"service": unit.service.name, "timeout_ms": max(1, round(unit.spec.timeout * 1000))}
        fallbacks = _fallback_meta(self.plan, unit)
        if fallbacks:
            meta["fallbacks"] = fallbacks
            if any(f["kind"] == "service" for f in fallbacks):
                meta["body_limit"] = unit.service.max_body_buffer
        if strip is not None:
            meta["strip"] = strip
        if retries_resets(unit):
            meta["head_bound"] = True  # the Lua filter answers a head over riprap's bounds 502
            self.sink.add(unit.service.name, "retry",
                          "an answer head over 1 MiB or 4096 headers is retried like a reset "
                          "(riprap: a 502 never retried)")
        lim = unit.spec.limit
        if lim is not None:
            meta["limited"] = True  # the Lua filter counts the calls over the limit (/state)
        if lim is not None and lim.rate > 0 and math.ceil(1 / lim.rate - 1e-9) > 1:
            meta["retry_after"] = str(math.ceil(1 / lim.rate - 1e-9))
        if unit.spec.breaker is not None:
            meta["breaker"] = breaker_meta(unit.spec.breaker)
            meta["breaker_key"] = unit.cluster
            self.sink.add(unit.service.name, "breaker",
                          "each attempt counts and is let through or refused by the breaker as its call found "
                          "it plus the call's own attempts (other calls' outcomes meanwhile are seen by the "
                          "next call); `slow` is judged on a call's last attempt; each Envoy worker keeps "
                          "its own breaker")
        if shard_meta is not None:
            meta["shard"] = shard_meta
        if unit.spec.retry is not None or unit.spec.hedge is not None:
            meta["resend"] = True  # riprap.lua puts the call's deadline where each attempt reads it
        h = unit.spec.hedge
        if h is not None and h.delay is None and h.percentile is not None:
            meta["hedge"] = {"p": h.percentile, "min_ms": h.min_delay * 1000,
                             "initial_ms": h.initial_delay * 1000, "warmup": h.warmup_calls}
            meta["latency_key"] = unit.cluster
        if h is not None:
            # Envoy counts a hedge copy as a retry: the answer counts the copies that
            # lua/riprap_upstream.lua saw leave while another attempt was in flight
            meta["hedged"] = True
        if unit.spec.retry is not None and unit.spec.retry.budget is not None:
            meta["budgeted"] = True  # the answer counts the retries the budget refused
        return meta

    def shard_unit_meta(self, unit: Unit, shard_meta: dict[str, Any], strip: str | None) -> dict[str, Any]:
        """What the Lua filter needs of one shard's routes, before its route is chosen: Envoy
        keeps handing Lua the first route's metadata after the shard pick clears the route
        cache, so the shard-less route carries each shard's (`safe`: idempotent calls)."""
        lua = self._meta(unit, None, strip)
        out: dict[str, Any] = {"safe": lua, "other": _without_hedge(lua)}
        if unit.spec.retry is not None or unit.spec.hedge is not None:
            # as unit_routes splits them: these methods, or an Idempotency-Key, are `safe`
            methods = unit.spec.retry.methods if unit.spec.retry is not None else IDEMPOTENT_METHODS
            out["methods"] = {m: True for m in sorted(set(methods))}
        return out

    def unit_routes(self, unit: Unit, match: dict[str, Any], rewrite: str | None,
                    shard_meta: dict[str, Any] | None, strip: str | None) -> list[dict[str, Any]]:
        """The routes of one unit under `match`: idempotent calls, then the others."""
        spec = unit.spec
        hedge_delay, hedge_extra = _hedge(unit, self.sink)
        base_path = {target(e).path for e in spec.endpoints}
        if len(base_path) > 1:
            self.sink.add(unit.service.name, "endpoint",
                          "endpoints with different paths: every call uses the first endpoint's path")
        prefix = sorted(base_path)[0] if base_path else ""
        action: dict[str, Any] = {
            "cluster": unit.cluster,
            "timeout": duration(spec.timeout),
            "auto_host_rewrite": True,
        }
        if rewrite is not None or prefix:
            # `/NAME/rest` -> `/rest`, after the endpoint's own path prefix
            action["prefix_rewrite"] = prefix + "/"
        rate_limits = _rate_limits(unit, self.plan, self.shared_ok, self.sink)
        if rate_limits:
            action["rate_limits"] = rate_limits
        per_filter: dict[str, Any] = {}
        if self.chaos and spec.chaos:
            per_filter[FAULT] = _fault(spec.chaos, unit.service.name, self.sink)
        meta = {LUA_META: {LUA: self._meta(unit, shard_meta, strip)}}
        unsafe_meta = {LUA_META: {LUA: _without_hedge(meta[LUA_META][LUA])}}

        def route(extra_match: list[dict[str, Any]], safe: bool) -> dict[str, Any]:
            act = dict(action)
            policy = _retry_policy(unit, spec.retry, safe=safe, hedge_extra=hedge_extra, sink=self.sink)
            if hedge_delay is not None and safe:
                act["hedge_policy"] = {"hedge_on_per_try_timeout": True}
                if policy is not None:
                    policy["per_try_timeout"] = duration(hedge_delay)
            if policy is not None:
                act["retry_policy"] = policy
            m = dict(match)
            if extra_match or "headers" in m:
                m["headers"] = list(m.get("headers", [])) + extra_match
            route_meta = meta if safe else unsafe_meta
            tries = tries_meta(unit, spec.retry, safe=safe, hedge_extra=hedge_extra)
            if tries is not None:
                route_meta = {LUA_META: {LUA: {**route_meta[LUA_META][LUA], "tries": tries}}}
            out: dict[str, Any] = {"match": m, "route": act, "metadata": route_meta,
                                   "request_headers_to_add": [DEADLINE],
                                   "request_headers_to_remove": [SHARD_HEADER],
                                   "response_headers_to_add": [ATTEMPTS]}
            if tries is not None:
                out["response_headers_to_remove"] = [RETRY_HEADER, RETRY_AFTER_HEADER]
            if per_filter:
                out["typed_per_filter_config"] = dict(per_filter)
            return out

        may_resend = spec.retry is not None or spec.hedge is not None
        if not may_resend:
            return [route([], True)]
        methods = spec.retry.methods if spec.retry is not None else IDEMPOTENT_METHODS
        regex = "^(" + "|".join(sorted(set(methods))) + ")$"
        return [
            route([{"name": "idempotency-key", "present_match": True}], True),
            route([{"name": ":method", "string_match": {"safe_regex": {"regex": regex}}}], True),
            route([], False),
        ]

    def service_routes(self, service_name: str, prefix: str | None) -> list[dict[str, Any]]:
        """Routes of a service: under `/` (its own virtual host) or under `/NAME/` (catch-all)."""
        svc = self.plan.services[service_name]
        units = units_of(svc)
        matches: list[tuple[dict[str, Any], str | None]]
        if prefix is None:
            matches = [({"prefix": "/"}, None)]
        else:
            matches = [({"prefix": prefix + "/"}, "/"), ({"path": prefix}, "/")]
        routes: list[dict[str, Any]] = []
        shard_meta: dict[str, Any] | None = None
        if svc.sharding is not None:
            shard_meta = {
                "by": svc.sharding.by,
                "key": svc.sharding.key,
                "names": [s.name for s in svc.shards],
                "timeouts": {s.name: max(1, round(s.timeout * 1000)) for s in svc.shards},
            }
            if svc.sharding.default is not None:
                shard_meta["default"] = svc.sharding.default
            if prefix is not None:
                shard_meta["strip"] = prefix
        for match, rewrite in matches:
            for unit in units:
                m: dict[str, Any] = dict(match)
                if unit.shard is not None:
                    m["headers"] = [{"name": SHARD_HEADER, "string_match": {"exact": unit.shard}}]
                routes.extend(self.unit_routes(unit, m, rewrite, shard_meta, prefix))
            if shard_meta is not None:
                # no shard picked yet: the Lua filter reads this route, sets x-riprap-shard
                # and clears the route cache; reaching the router here means no shard
                meta = {"service": svc.name, "shard": shard_meta,
                        "timeout_ms": max(1, round(svc.timeout * 1000)),
                        "units": {u.shard: self.shard_unit_meta(u, shard_meta, prefix)
                                  for u in units if u.shard is not None}}
                routes.append({
                    "match": dict(match),
                    "direct_response": {"status": 400, "body": {"inline_string": json.dumps(
                        {"error": "no shard key", "reason": "no-shard-key", "service": svc.name})}},
                    "metadata": {"filter_metadata": {LUA: meta}},
                    "response_headers_to_add": [
                        _header("x-riprap-reason", "no-shard-key"),
                        _header("content-type", "application/json"),
                    ],
                })
        return routes


def _without_hedge(lua: dict[str, Any]) -> dict[str, Any]:
    """A route's Lua metadata for calls that may not be sent twice: no hedge, so no per-try
    (hedge) timeout override either."""
    return {k: v for k, v in lua.items() if k not in ("hedge", "latency_key", "hedged")}


# the upstream Lua filter's wait between attempts: a request that the `riprap.delay` fault
# filter holds for `x-envoy-fault-delay-request` ms, then 204
SLEEP_ROUTE: dict[str, Any] = {
    "match": {"path": "/sleep"},
    "direct_response": {"status": 204},
    "typed_per_filter_config": {DELAY: {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        "delay": {"header_delay": {}, "percentage": {"numerator": 100, "denominator": "HUNDRED"}},
    }},
}


def _header(key: str, value: str) -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _stamp(route: dict[str, Any]) -> None:
    """Give the route's Lua metadata an `id` (a hash of the rest), and the route that name:
    the Lua filter converts a route's metadata once per id instead of on every call, and
    finds it by the route's name (Envoy copies the metadata on every handle:metadata())."""
    meta = route.get("metadata", {}).get(LUA_META, {}).get(LUA)
    if meta is None:
        return
    meta.pop("id", None)
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    rid = hashlib.sha256(text.encode()).hexdigest()[:16]
    route["name"] = rid
    route["metadata"] = {LUA_META: {LUA: {"id": rid, **meta}}}


def _connect_refusal(plan: Plan, status: int) -> dict[str, Any]:
    """CONNECT is never honoured (policies cannot apply inside a tunnel): 405 for a declared
    host, 403 for any other, as on the python engine."""
    if status == 403:
        body, reason = unknown_service_body(plan), "unknown-service"
    else:
        reason = "connect-unsupported"
        body = json.dumps({"error": "CONNECT tunnels are not supported: send plain http:// requests "
                           "through the proxy so that policies apply", "reason": reason,
                           "services": sorted(plan.services)})
    return {
        "match": {"connect_matcher": {}},
        "direct_response": {"status": status, "body": {"inline_string": body}},
        "response_headers_to_add": [
            _header("x-riprap-reason", reason),
            _header("content-type", "application/json"),
            _header("x-riprap-attempts", "0"),
        ],
    }


def _forward_proxy_refusal(plan: Plan) -> dict[str, Any]:
    """403 for a forward-proxy call to a host the plan does not name, whatever its path: Envoy
    routes it to the catch-all virtual host, where the Lua filter marks it (an absolute-form
    request line) and clears the route cache, so that it matches here."""
    return {
        "match": {"prefix": "/", "headers": [{"name": FORWARD_PROXY_HEADER, "present_match": True}]},
        "direct_response": {"status": 403, "body": {"inline_string": unknown_service_body(plan)}},
        "response_headers_to_add": [
            _header("x-riprap-reason", "unknown-service"),
            _header("content-type", "application/json"),
            _header("x-riprap-attempts", "0"),
        ],
    }


def unknown_service_body(plan: Plan) -> str:
    return json.dumps({"error": "unknown service", "reason": "unknown-service",
                       "services": sorted(plan.services)})


def build_route_config(plan: Plan, sink: NoteSink, *, chaos: bool, shared_ok: bool) -> dict[str, Any]:
    builder = RouteBuilder(plan, sink, chaos=chaos, shared_ok=shared_ok)
    vhosts: list[dict[str, Any]] = []
    taken: set[str] = set()
    catch_all: list[dict[str, Any]] = []
    for name in sorted(plan.services):
        svc = plan.services[name]
        domains = []
        for host in (name, *svc.hosts):
            h = host.lower().rstrip(".")
            if h not in taken:
                taken.add(h)
                domains.append(h)
        if domains:
            vhosts.append({"name": f"service:{name}", "domains": domains,
                           "routes": [_connect_refusal(plan, 405), *builder.service_routes(name, None)]})
        catch_all.extend(builder.service_routes(name, f"/{name}"))
    catch_all.append({
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": unknown_service_body(plan)}},
        "response_headers_to_add": [
            _header("x-riprap-reason", "unknown-service"),
            _header("content-type", "application/json"),
            _header("x-riprap-attempts", "0"),
        ],
    })
    # a host the plan does not name: the Lua filter turns a forward-proxy call into 403
    for route in catch_all:
        route.setdefault("metadata", {LUA_META: {LUA: {}}})[LUA_META][LUA]["unknown_host"] = True
    catch_all.insert(0, _forward_proxy_refusal(plan))
    catch_all.insert(0, _connect_refusal(plan, 403))
    # this Envoy's breakers and counters of fallbacks, stale copies and hedges (the Lua
    # filter answers), for riprap's /state and /metrics
    state_routes: list[dict[str, Any]] = [{
        "match": {"path": f"/{what}"},
        "direct_response": {"status": 404},
        "metadata": {"filter_metadata": {LUA: {"riprap_state": what}}},
    } for what in ("breakers", "counters")]
    if resends(plan):
        state_routes.append(copy.deepcopy(SLEEP_ROUTE))
    vhosts.append({"name": "riprap:state", "domains": [STATE_HOST], "routes": state_routes})
    vhosts.append({"name": "riprap:unknown", "domains": ["*"], "routes": catch_all})
    for vhost in vhosts:
        for route in vhost["routes"]:
            _stamp(route)
    return {
        "name": "riprap",
        "virtual_hosts": vhosts,
        "request_headers_to_remove": [*HOP_BY_HOP_REQUEST, FORWARD_PROXY_HEADER],
        "response_headers_to_remove": ["x-envoy-upstream-service-time", *HOP_BY_HOP_RESPONSE],
        "max_direct_response_body_size_bytes": 1024 * 1024,
    }


__all__ = ["LOCAL_RATELIMIT", "LUA", "FAULT", "SHARED_STAGE", "LOCAL_STAGE", "build_route_config"]
