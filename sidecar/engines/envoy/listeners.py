"""The listener: one HTTP connection manager on `listen`, with riprap's HTTP filters.

Filter order follows the plan's call order (limit, then chaos just before the call
leaves): the riprap Lua filter (shard pick, deadline, static fallbacks), the local rate
limit, the global rate limit (shared limits, against riprap's gRPC service), the fault
filter (only with chaos on), the router. Every answer Envoy makes itself goes through
the local-reply mappers, which give it riprap's status, `x-riprap-reason` and JSON body.
With retries or hedges, the router runs the upstream Lua filter (lua/riprap_upstream.lua)
on every attempt, and a second fault filter (`riprap.delay`) holds its waits.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

from dsl.plan import LimitSpec, Plan
from sidecar.engines.envoy.names import RATELIMIT_CLUSTER
from sidecar.engines.envoy.notes import NoteSink
from sidecar.engines.envoy.routes import DELAY, FAULT, LOCAL_RATELIMIT, LOCAL_STAGE, LUA, SHARED_STAGE
from sidecar.engines.envoy.units import PRESERVE_CASE, all_units, duration, resends

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
LOCAL_RATELIMIT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
LIMIT_RELOAD_DIFFERS = ("a reload that changes any service's local limit starts every local bucket "
                        "full again (Envoy's local rate limit filter is configured as one whole); "
                        "other reloads keep them")
FILL_STEP = 0.05  # Envoy's smallest token-bucket fill interval (50 ms)


def upstream_lua_source() -> str:
    """riprap's upstream Lua filter, run by the router on every attempt."""
    pkg = resources.files("sidecar.engines.envoy") / "lua"
    return (pkg / "riprap_upstream.lua").read_text(encoding="utf-8")


LUA_TYPE = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
CODEC = {"name": "envoy.filters.http.upstream_codec", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}}


# Headers the router adds that the client did not send (section 9, faithful forwarding: the
# Python engine sends the headers as sent): the expected timeout, and the original path of
# a stripped prefix, dropped from each attempt after the route's headers were added (so
# `x-riprap-deadline-ms` is still read from the expected timeout). What stays (docs/engines.md):
# `x-forwarded-proto` (the HCM adds it only when absent: nothing later can tell Envoy's from
# a client's) and `x-envoy-original-host` (auto_host_rewrite adds it after the upstream
# filters; only the router's suppress_envoy_headers drops it, and that drops the expected
# timeout too).
ENVOY_ADDED = ("x-envoy-expected-rq-timeout-ms", "x-envoy-original-path")
HEADER_MUTATION = {"name": "riprap.envoy_added", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
    "mutations": {"request_mutations": [{"remove": name} for name in ENVOY_ADDED]}}}


def upstream_filter_config(plan: Plan) -> dict[str, Any]:
    """The upstream Lua filter's configuration, as its own resource (`ecds-upstream.yaml`):
    riprap_upstream.lua when a service resends calls, else a script that does nothing."""
    source = upstream_lua_source() if resends(plan) else "-- riprap: no service of the plan resends a call\n"
    return {"@type": LUA_TYPE, "default_source_code": {"inline_string": source}}


def _router(plan: Plan, upstream_source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The router; with retries or hedges, the upstream Lua filter on each attempt. With
    `upstream_source` (a ConfigSource) that filter is always there, configured from it, so
    that the first service that resends a call does not change the listener."""
    router: dict[str, Any] = {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    if upstream_source is not None:
        router["upstream_http_filters"] = [
            {"name": LUA, "config_discovery": {"config_source": upstream_source, "type_urls": [LUA_TYPE]}},
            HEADER_MUTATION, CODEC,
        ]
    elif resends(plan):
        router["upstream_http_filters"] = [
            {"name": LUA, "typed_config": upstream_filter_config(plan)},
            HEADER_MUTATION, CODEC,
        ]
    else:
        router["upstream_http_filters"] = [HEADER_MUTATION, CODEC]
    return {"name": "envoy.filters.http.router", "typed_config": router}


def lua_source() -> str:
    """riprap's Lua filter, with the BLAKE2b module inlined (Envoy runs one chunk)."""
    pkg = resources.files("sidecar.engines.envoy") / "lua"
    blake = (pkg / "blake2b.lua").read_text(encoding="utf-8")
    main = (pkg / "riprap.lua").read_text(encoding="utf-8")
    return f"local blake2b = (function()\n{blake}\nend)()\n\n{main}"


def _header(key: str, value: str) -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _status_is(code: int) -> dict[str, Any]:
    return {"status_code_filter": {"comparison": {
        "op": "EQ", "value": {"default_value": code, "runtime_key": f"riprap.local_reply_{code}"}}}}


def _mapper(flags: list[str], status: int | None, reason: str, error: str,
            extra: list[dict[str, Any]] | None = None, *,
            or_status: int | None = None) -> dict[str, Any]:
    flt: dict[str, Any] = {"response_flag_filter": {"flags": flags}}
    if or_status is not None:
        # Envoy's own answers only (an upstream's 429 is not a local reply)
        flt = {"or_filter": {"filters": [flt, _status_is(or_status)]}}
    m: dict[str, Any] = {
        "filter": flt,
        "headers_to_add": [_header("x-riprap-reason", reason),
                           _header("x-riprap-attempts", "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"),
                           *(extra or [])],
        "body_format_override": {
            "json_format": {"error": error, "reason": reason,
                            "service": f"%METADATA(ROUTE:{LUA}:service)%"},
        },
    }
    if status is not None:
        m["status_code"] = status
    return m


def _codec_error() -> dict[str, Any]:
    """An answer of the HTTP codec itself (a request it could not parse), not of a route or
    of the Lua filter, which set their own `x-riprap-reason`."""
    return {"extension_filter": {
        "name": "envoy.access_loggers.extension_filters.cel",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
            "expression": "response.code_details.startsWith('http1.') || "
                          "response.code_details.startsWith('http2.')",
        },
    }}


def _upgrade_refusal() -> dict[str, Any]:
    """An upgrade Envoy has no `upgrade_configs` entry for (anything but WebSocket and
    CONNECT) is refused before routing with a bare 403: riprap's 501 `upgrade-unsupported`."""
    upgrade = "upgrade"
    return {
        "filter": {"and_filter": {"filters": [
            _status_is(403),
            {"header_filter": {"header": {"name": upgrade, "present_match": True}}},
            {"header_filter": {"header": {"name": upgrade, "invert_match": True, "string_match": {
                "safe_regex": {"regex": "(?i).*websocket.*"}}}}},
        ]}},
        "status_code": 501,
        "headers_to_add": [_header("x-riprap-reason", "upgrade-unsupported"),
                           _header("x-riprap-attempts", "0")],
        "body_format_override": {"json_format": {
            "error": "upgrade to '%REQ(upgrade)%' is not supported: only WebSocket "
                     "(GET with Upgrade: websocket) is relayed",
            "reason": "upgrade-unsupported"}},
    }


def local_reply_config() -> dict[str, Any]:
    """riprap's own answers for Envoy's failures (by response flag), first match wins."""
    return {
        "mappers": [
            _upgrade_refusal(),
            # the codec's refusals of a request head: over the bounds (431), or malformed
            {"filter": _status_is(431),
             "headers_to_add": [_header("x-riprap-reason", "headers-too-large"),
                                _header("x-riprap-attempts", "0")],
             "body_format_override": {"json_format": {
                 "error": "the request head is over 64 KiB or 256 headers", "reason": "headers-too-large"}}},
            {"filter": {"and_filter": {"filters": [_status_is(400), _codec_error()]}},
             "headers_to_add": [_header("x-riprap-reason", "bad-request"), _header("x-riprap-attempts", "0")],
             "body_format_override": {"json_format": {
                 "error": "the request could not be parsed", "reason": "bad-request"}}},
            _mapper(["RL"], 429, "rate-limited", "rate limited", [_header("retry-after", "1")], or_status=429),
            _mapper(["UO"], 503, "overloaded", "too many calls in flight"),
            _mapper(["UH"], 503, "no-healthy-endpoint", "no healthy endpoint"),
            _mapper(["UT"], 504, "timeout", "timed out"),
            _mapper(["UF", "UC", "UR", "UPE", "URX", "LH"], 502, "upstream-failed", "upstream failed"),
            {
                "filter": {"response_flag_filter": {"flags": ["FI"]}},
                "headers_to_add": [_header("x-riprap-reason", "chaos-abort"), _header("x-riprap-chaos", "abort"),
                                   _header("x-riprap-attempts", "0")],
                "body_format_override": {"json_format": {"error": "injected by riprap chaos"}},
            },
        ]
    }


def token_bucket(rate: float, burst: float) -> dict[str, Any]:
    """Envoy's token bucket for `rate` per second: the shortest fill interval, a multiple of
    50 ms, that adds a whole number of tokens (exact for whole rates per second, and per
    minute or hour below 1/s)."""
    interval, tokens = 1.0, max(1, round(rate))
    if rate < 1:
        interval, tokens = max(1, round(1 / rate / FILL_STEP)) * FILL_STEP, 1
    else:
        for k in range(1, 21):
            t = rate * FILL_STEP * k
            if t >= 1 and abs(t - round(t)) < 1e-6:
                interval, tokens = FILL_STEP * k, round(t)
                break
    return {"max_tokens": max(1, math.ceil(burst)), "tokens_per_fill": tokens, "fill_interval": duration(interval)}


def _local_ratelimit(plan: Plan, shared_ok: bool, sink: NoteSink) -> dict[str, Any] | None:
    descriptors: list[dict[str, Any]] = []
    seen: set[str] = set()
    max_keys = 0
    for unit in all_units(plan):
        lim: LimitSpec | None = unit.spec.limit
        if lim is None or (lim.shared and shared_ok) or unit.service.name in seen:
            continue
        if unit.shard is not None and lim != unit.service.limit:
            sink.add(unit.service.name, "limit", "one bucket for the whole service: a shard's own limit is not kept")
        seen.add(unit.service.name)
        sink.add(unit.service.name, "limit", LIMIT_RELOAD_DIFFERS)
        entries: list[dict[str, Any]] = [{"key": "riprap_service", "value": unit.service.name}]
        if lim.per_header:
            entries.append({"key": "riprap_key", "value": ""})  # a bucket per header value
            max_keys = max(max_keys, lim.max_keys)
            sink.add(unit.service.name, "limit per header",
                     "Envoy keeps each value whole (not a fixed-size digest) among its bounded "
                     "buckets (the last 10000 values used)")
        descriptors.append({"entries": entries, "token_bucket": token_bucket(lim.rate, lim.burst)})
    if not descriptors:
        return None
    return {
        "name": LOCAL_RATELIMIT,
        "typed_config": {
            "@type": LOCAL_RATELIMIT_TYPE,
            "stat_prefix": "riprap_limit",
            "stage": LOCAL_STAGE,
            "token_bucket": {"max_tokens": 1_000_000_000, "tokens_per_fill": 1_000_000_000, "fill_interval": "0.05s"},
            "always_consume_default_token_bucket": False,
            "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"},
                               "runtime_key": "riprap_limit_enabled"},
            "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"},
                                "runtime_key": "riprap_limit_enforced"},
            "descriptors": descriptors,
            **({"max_dynamic_descriptors": max_keys} if max_keys else {}),  # Envoy's default is 20
        },
    }


def limit_filter_config(plan: Plan, shared_ok: bool, sink: NoteSink) -> dict[str, Any]:
    """The local rate limit filter's configuration, as its own resource (`ecds.yaml`): the
    plan's buckets, or a filter that does nothing when no service has a local limit."""
    local = _local_ratelimit(plan, shared_ok, sink)
    if local is not None:
        return dict(local["typed_config"])
    return {"@type": LOCAL_RATELIMIT_TYPE, "stat_prefix": "riprap_limit"}  # enabled for 0 % of calls


def _global_ratelimit(plan: Plan) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            "domain": plan.app,
            "stage": SHARED_STAGE,
            "failure_mode_deny": False,  # a rate limit service that is down never blocks calls
            "timeout": "0.05s",
            "rate_limit_service": {
                "grpc_service": {"envoy_grpc": {"cluster_name": RATELIMIT_CLUSTER}},
                "transport_api_version": "V3",
            },
        },
    }


def http_filters(plan: Plan, sink: NoteSink, *, chaos: bool, shared_ok: bool,
                 limit_source: dict[str, Any] | None = None,
                 upstream_source: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The listener's HTTP filters. With `limit_source` (a ConfigSource), the local rate
    limit filter is always there and takes its configuration from that source (extension
    config discovery), so that a change of limits leaves the listener as it is: its
    connections, and the Lua filter's state (breakers, stale copies), carry over, and calls
    on kept-alive connections see the new limits at once."""
    filters: list[dict[str, Any]] = [{
        "name": LUA,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": lua_source()},
        },
    }]
    if limit_source is not None:
        filters.append({"name": LOCAL_RATELIMIT, "config_discovery": {
            "config_source": limit_source, "type_urls": [LOCAL_RATELIMIT_TYPE]}})
    else:
        local = _local_ratelimit(plan, shared_ok, sink)
        if local is not None:
            filters.append(local)
    units = all_units(plan)
    if shared_ok and any(u.spec.limit is not None and u.spec.limit.shared for u in units):
        filters.append(_global_ratelimit(plan))
        for u in units:
            if u.spec.limit is not None and u.spec.limit.shared:
                sink.add(u.service.name, "limit shared",
                         "if riprap's rate limit service does not answer in 50 ms the call is let through")
    stable = upstream_source is not None  # the same filters whatever the plan (run mode)
    if chaos and (stable or any(u.spec.chaos for u in units)):
        filters.append({"name": FAULT, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}})
    if stable or resends(plan):
        # holds the upstream Lua filter's `/sleep` requests (routes.py SLEEP_ROUTE) for as
        # long as they ask: how it waits between attempts; no other route enables it
        filters.append({"name": DELAY, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}})
    filters.append(_router(plan, upstream_source))
    return filters


def build_listener(plan: Plan, host: str, port: int, rds: dict[str, Any], sink: NoteSink,
                   *, chaos: bool, shared_ok: bool,
                   limit_source: dict[str, Any] | None = None,
                   upstream_source: dict[str, Any] | None = None) -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "@type": HCM,
        "stat_prefix": "riprap",
        "codec_type": "AUTO",
        # routes come from their own watched file: a plan change that only touches routes
        # leaves the listener (its connections and the Lua filter's state) as it is
        "rds": rds,
        "http_filters": http_filters(plan, sink, chaos=chaos, shared_ok=shared_ok,
                                     limit_source=limit_source, upstream_source=upstream_source),
        "strip_any_host_port": True,  # Host routing ignores the port
        "max_request_headers_kb": 64,  # a bigger head gets 431
        "common_http_protocol_options": {"idle_timeout": "5s", "max_headers_count": 256},
        # an idle timeout starts Envoy's drain sequence, which closes the connection after
        # drain_timeout (default 5 s): idle keep-alive connections close at about 5 s
        "drain_timeout": "0.25s",
        "request_headers_timeout": "10s",
        # HTTP/1.0 as on the python engine; one without Host is routed by its `/NAME/` prefix
        # (the listener's own address is no service's name)
        "http_protocol_options": {"header_key_format": PRESERVE_CASE, "accept_http_10": True,
                                  "default_host_for_http_10": (f"[{host}]" if ":" in host else host) + f":{port}"},
        "normalize_path": False,  # the path reaches the upstream as the client sent it
        "merge_slashes": False,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        # CONNECT reaches the routes only to be refused there (routes.py _connect_refusal)
        "upgrade_configs": [{"upgrade_type": "websocket"}, {"upgrade_type": "CONNECT"}],
        "generate_request_id": False,  # riprap adds no request id (and a UUID per call costs)
        "local_reply_config": local_reply_config(),
    }
    return {
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": "riprap",
        "address": {"socket_address": {"address": host, "port_value": port}},
        "per_connection_buffer_limit_bytes": 1024 * 1024,
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }


__all__ = ["build_listener", "limit_filter_config", "upstream_filter_config", "local_reply_config", "lua_source", "token_bucket"]
