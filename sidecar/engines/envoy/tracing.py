"""Tracing on the Envoy engine (contract section 9, "Tracing"): Envoy's own OpenTelemetry tracer.

Only when riprap's environment has `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is) or
`OTEL_EXPORTER_OTLP_ENDPOINT` (+ `/v1/traces`, as the SDK does): `tracing_from_env`
returns None otherwise and the configuration has no tracing at all (zero cost). The
other standard variables are read here, once, and baked into the configuration:
`OTEL_SERVICE_NAME` (default: the plan's `app`), `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`, `_TIMEOUT` and `_CERTIFICATE`, `OTEL_SDK_DISABLED`,
`OTEL_TRACES_SAMPLER`/`_ARG` (mapped to Envoy's OpenTelemetry samplers) and
`OTEL_BSP_SCHEDULE_DELAY` and `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (when Envoy exports).

What Envoy makes of it: the HCM's span per call, named by the route's decorator `riprap
SERVICE`, kind CLIENT (the listener's traffic direction is OUTBOUND), the child of an
incoming W3C `traceparent`; the router's `start_child_span` adds one CLIENT span per
attempt (`router SERVICE egress`, Envoy's name), the call span's only children, and each
attempt sends its own `traceparent` upstream. Spans go over OTLP/HTTP (`http_service`)
through the `_riprap_otel` cluster, the collector's host:port. docs/engines.md lists
what differs from the Python engine's spans.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

from sidecar.engines.envoy.notes import NoteSink
from sidecar.engines.envoy.units import duration, is_ip

OTEL_CLUSTER = "_riprap_otel"  # service names start with a letter: no clash
TRACER = "envoy.tracers.opentelemetry"
SAMPLERS = "envoy.extensions.tracers.opentelemetry.samplers.v3"
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
DEFAULT_SAMPLER = "parentbased_always_on"  # the SDK's default
NOTE_SCOPE = "*"  # notes about tracing are not about one service


@dataclass(frozen=True)
class TracingSettings:
    """The tracing the standard OTEL_* variables ask for, as Envoy will do it."""

    scheme: str  # http or https
    host: str
    port: int
    path: str  # the traces path on the collector, e.g. /v1/traces
    service_name: str
    headers: tuple[tuple[str, str], ...]  # OTEL_EXPORTER_OTLP_[TRACES_]HEADERS
    sampler: dict[str, Any]  # an Envoy OpenTelemetry sampler (TypedExtensionConfig)
    resource: tuple[tuple[str, str], ...]  # OTEL_RESOURCE_ATTRIBUTES, less service.name
    timeout: float  # seconds, per export
    flush_ms: int  # OTEL_BSP_SCHEDULE_DELAY: Envoy's flush interval (the SDK's default, 5000)
    batch: int = 512  # OTEL_BSP_MAX_EXPORT_BATCH_SIZE: spans per export (Envoy's own default is 5)
    ca: str | None = None  # OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE (https; else the system's)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def traces_endpoint(env: Mapping[str, str]) -> str | None:
    """The OTLP/HTTP traces URL as the SDK derives it, or None when tracing is not asked for."""
    signal = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if signal:
        return signal
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not base:
        return None
    return base.rstrip("/") + "/v1/traces"


def _pairs(text: str) -> list[tuple[str, str]]:
    """`k1=v1,k2=v2` (W3C baggage-like, values percent-encoded), as the SDK reads it."""
    out: list[tuple[str, str]] = []
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out.append((unquote(key.strip()), unquote(value.strip())))
    return out


def _ratio(arg: str | None, sink: NoteSink) -> float:
    if arg is None or not arg.strip():
        return 1.0
    try:
        value = float(arg)
    except ValueError:
        sink.add(NOTE_SCOPE, "tracing", f"OTEL_TRACES_SAMPLER_ARG={arg!r} is not a number: 1.0 is used")
        return 1.0
    return min(1.0, max(0.0, value))


def _typed(name: str, message: str, **fields: Any) -> dict[str, Any]:
    return {"name": f"envoy.tracers.opentelemetry.samplers.{name}",
            "typed_config": {"@type": f"type.googleapis.com/{SAMPLERS}.{message}", **fields}}


def _ratio_sampler(ratio: float) -> dict[str, Any]:
    parts = round(ratio * 1_000_000)
    return _typed("trace_id_ratio_based", "TraceIdRatioBasedSamplerConfig",
                  sampling_percentage={"numerator": parts, "denominator": "MILLION"})


def sampler_config(name: str, arg: str | None, sink: NoteSink) -> dict[str, Any]:
    """OTEL_TRACES_SAMPLER -> Envoy's sampler: always_on, always_off (a 0 ratio),
    traceidratio, and their parentbased_ forms (the caller's sampled flag decides when a
    traceparent comes in). Others (jaeger_remote, xray) fall back to the default, said so."""
    name = name.strip().lower() or DEFAULT_SAMPLER
    parent = name.startswith("parentbased_")
    root = name.removeprefix("parentbased_")
    if root == "always_on":
        inner = _typed("always_on", "AlwaysOnSamplerConfig")
    elif root == "always_off":
        inner = _ratio_sampler(0.0)
    elif root == "traceidratio":
        inner = _ratio_sampler(_ratio(arg, sink))
    else:
        sink.add(NOTE_SCOPE, "tracing", f"OTEL_TRACES_SAMPLER={name} is not one Envoy has: "
                 f"{DEFAULT_SAMPLER} is used")
        parent, inner = True, _typed("always_on", "AlwaysOnSamplerConfig")
    if not parent:
        return inner
    return _typed("parent_based", "ParentBasedSamplerConfig", wrapped_sampler=inner)


def _millis(env: Mapping[str, str], *names: str) -> float | None:
    for name in names:
        raw = env.get(name, "").strip()
        if raw:
            try:
                return max(0.0, float(raw))
            except ValueError:
                return None
    return None


def tracing_from_env(app: str, environ: Mapping[str, str] | None = None,
                     sink: NoteSink | None = None) -> TracingSettings | None:
    """The tracing `environ` asks for (default: this process's environment), else None."""
    env = os.environ if environ is None else environ
    notes = sink if sink is not None else NoteSink()
    url = traces_endpoint(env)
    if url is None or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    scheme = parts.scheme.lower() if parts.scheme.lower() in ("http", "https") else "http"
    host = parts.hostname or "localhost"
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        port = 443 if scheme == "https" else 80
    headers_text = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS") or ""
    resource = [(k, v) for k, v in _pairs(env.get("OTEL_RESOURCE_ATTRIBUTES", "")) if k != "service.name"]
    timeout_ms = _millis(env, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
    flush = _millis(env, "OTEL_BSP_SCHEDULE_DELAY")
    batch = _millis(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
    return TracingSettings(
        scheme=scheme, host=host, port=port, path=parts.path or "/v1/traces",
        service_name=env.get("OTEL_SERVICE_NAME", "").strip() or app,
        headers=tuple(_pairs(headers_text)),
        sampler=sampler_config(env.get("OTEL_TRACES_SAMPLER", ""), env.get("OTEL_TRACES_SAMPLER_ARG"), notes),
        resource=tuple(resource),
        timeout=(timeout_ms if timeout_ms is not None else 10_000.0) / 1000,
        flush_ms=max(1, round(flush)) if flush is not None else 5000,
        batch=max(1, round(batch)) if batch is not None else 512,
        ca=(env.get("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE") or env.get("OTEL_EXPORTER_OTLP_CERTIFICATE")
            or None),
    )


def hcm_tracing(t: TracingSettings) -> dict[str, Any]:
    """The HTTP connection manager's `tracing`: the OpenTelemetry provider over OTLP/HTTP,
    a span per attempt, the call's decisions as tags."""
    provider: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
        "http_service": {
            "http_uri": {"uri": t.url, "cluster": OTEL_CLUSTER, "timeout": duration(t.timeout)},
            **({"request_headers_to_add": [
                {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                for k, v in t.headers]} if t.headers else {}),
        },
        "service_name": t.service_name,
        "sampler": t.sampler,
    }
    if t.resource:
        provider["resource_detectors"] = [{
            "name": "envoy.tracers.opentelemetry.resource_detectors.static_config",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.tracers.opentelemetry.resource_detectors"
                ".v3.StaticConfigResourceDetectorConfig",
                "attributes": dict(t.resource),
            },
        }]
    return {
        "provider": {"name": TRACER, "typed_config": provider},
        # evaluated once per call (Envoy puts them on the call's and its attempts' spans);
        # an empty value (no such header) adds no tag
        "custom_tags": [
            {"tag": "riprap.service", "value": "%METADATA(ROUTE:envoy.filters.http.lua:service)%"},
            {"tag": "riprap.attempts", "value": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"},
            {"tag": "riprap.reason", "value": "%RESP(x-riprap-reason)%"},
            {"tag": "riprap.fallback", "value": "%RESP(x-riprap-fallback)%"},
        ],
        "random_sampling": {"value": 100},  # the sampler above decides (riprap's own routes: 0)
    }


def trace_listener(listener: dict[str, Any], t: TracingSettings) -> None:
    """Trace every call on `listener`: OUTBOUND (riprap calls out for the app), the HCM's
    `tracing`, a span per attempt, and a request id to sample by."""
    listener["traffic_direction"] = "OUTBOUND"
    for chain in listener["filter_chains"]:
        for f in chain["filters"]:
            if f["name"] != "envoy.filters.network.http_connection_manager":
                continue
            hcm = f["typed_config"]
            hcm["tracing"] = hcm_tracing(t)
            for hf in hcm["http_filters"]:
                if hf["name"] == "envoy.filters.http.router":
                    # a CLIENT span per attempt under the call's CLIENT span (the HCM's
                    # spawn_upstream_span would make the call span SERVER)
                    hf["typed_config"]["start_child_span"] = True
            # Envoy decides "traceable" by request id (none: never traced, whatever the
            # sampler says): one per call while tracing, a caller's own x-request-id kept;
            # it is also what leaves riprap's own routes untraced (decorate_routes)
            hcm["generate_request_id"] = True
            hcm["preserve_external_request_id"] = True
            hcm["request_id_extension"] = {"typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                "pack_trace_reason": False}}


def collector_cluster(t: TracingSettings) -> dict[str, Any]:
    """The collector named by the endpoint (the user's own, wherever they said); over TLS
    for https, its certificate checked against the host name, as the SDK does."""
    from sidecar.engines.envoy.clusters import SYSTEM_CA

    ip = is_ip(t.host)
    cluster: dict[str, Any] = {
        "name": OTEL_CLUSTER,
        "type": "STATIC" if ip else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": OTEL_CLUSTER, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": t.host, "port_value": t.port}}}}]}]},
    }
    if not ip:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if t.scheme == "https":
        tls: dict[str, Any] = {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {"validation_context": {
                "trusted_ca": {"filename": t.ca or SYSTEM_CA},
                "match_typed_subject_alt_names": [
                    {"san_type": "IP_ADDRESS" if ip else "DNS", "matcher": {"exact": t.host}}],
            }},
        }
        if not ip:
            tls["sni"] = t.host
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return cluster


def runtime_layer(t: TracingSettings) -> dict[str, Any]:
    """The bootstrap's runtime: Envoy exports its spans every `flush_ms` or once `batch`
    are buffered, as the SDK's batch processor does (Envoy's own default, an export per 5
    spans, would be a request per two or three calls). The admin layer stays."""
    return {"layers": [
        {"name": "riprap_tracing", "static_layer": {
            "tracing.opentelemetry.flush_interval_ms": t.flush_ms,
            "tracing.opentelemetry.min_flush_spans": t.batch}},
        {"name": "admin", "admin_layer": {}},
    ]}


def decorate_routes(route_config: dict[str, Any]) -> None:
    """Name every call span `riprap SERVICE` (the route's decorator); riprap's own routes
    (the `_riprap` host Envoy's breakers are read from) are never traced."""
    from sidecar.engines.envoy.routes import LUA, LUA_META

    for vhost in route_config.get("virtual_hosts", ()):
        for route in vhost.get("routes", ()):
            meta = route.get("metadata", {}).get(LUA_META, {}).get(LUA, {})
            service = meta.get("service")
            if service:
                route["decorator"] = {"operation": f"riprap {service}"}
            else:
                route["tracing"] = {"overall_sampling": {"numerator": 0, "denominator": "HUNDRED"}}


__all__ = ["OTEL_CLUSTER", "TracingSettings", "collector_cluster", "decorate_routes",
           "hcm_tracing", "trace_listener", "runtime_layer", "sampler_config", "traces_endpoint", "tracing_from_env"]
