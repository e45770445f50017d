"""A tiny Plan -> Envoy configuration builder for the running side's own tests.

It knows only routing (Host and `/NAME/` prefix) and endpoints, which is all the process,
reload and admin code needs to be tested against a real Envoy; the real back end is
`sidecar.engines.envoy.config`. Same shape: a bootstrap naming `lds.yaml` and `cds.yaml`
in a watched directory, routes inline in the listener.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dsl.plan import Plan

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


@dataclass(frozen=True)
class Ports:
    listen_host: str
    listen_port: int
    admin_port: int
    ratelimit_port: int | None = None


@dataclass(frozen=True)
class Config:
    bootstrap: dict[str, Any]
    resources: dict[str, dict[str, Any]]
    notes: tuple[Any, ...] = ()


def cluster_name(service: str, shard: str | None = None) -> str:
    return f"svc_{service}" if shard is None else f"svc_{service}_{shard}"


def _source(path: Path) -> dict[str, Any]:
    return {"resource_api_version": "V3",
            "path_config_source": {"path": str(path), "watched_directory": {"path": str(path.parent)}}}


def build_config(plan: Plan, ports: Ports, *, dynamic_dir: Path, chaos: bool) -> Config:
    boot = {
        "node": {"id": "riprap", "cluster": plan.app},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ports.admin_port}}},
        "dynamic_resources": {"cds_config": _source(dynamic_dir / "cds.yaml"),
                              "lds_config": _source(dynamic_dir / "lds.yaml")},
    }
    clusters, vhosts, prefix_routes = [], [], []
    for name, svc in plan.services.items():
        lb = []
        for ep in svc.endpoints:
            u = urlsplit(ep.url)
            lb.append({"endpoint": {"address": {"socket_address": {
                "address": u.hostname, "port_value": u.port or 80}}},
                "load_balancing_weight": ep.weight, "priority": ep.tier})
        tiers = sorted({e["priority"] for e in lb})
        cluster: dict[str, Any] = {
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": cluster_name(name), "type": "STATIC", "connect_timeout": "1s",
            "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
            "load_assignment": {"cluster_name": cluster_name(name), "endpoints": [
                {"priority": t, "lb_endpoints": [
                    {k: v for k, v in e.items() if k != "priority"} for e in lb if e["priority"] == t]}
                for t in tiers]}}
        if svc.outlier is not None:
            cluster["outlier_detection"] = {"consecutive_5xx": svc.outlier.failures,
                                            "base_ejection_time": f"{svc.outlier.eject}s",
                                            "max_ejection_percent": round(svc.outlier.max_fraction * 100)}
        clusters.append(cluster)
        route = {"cluster": cluster_name(name), "timeout": f"{svc.timeout}s"}
        vhosts.append({"name": name, "domains": sorted({name, *svc.hosts} | {f"{h}:*" for h in (name, *svc.hosts)}),
                       "routes": [{"match": {"prefix": "/"}, "route": route}]})
        prefix_routes.append({"match": {"prefix": f"/{name}/"},
                              "route": {**route, "prefix_rewrite": "/"}})
    vhosts.append({"name": "_prefix", "domains": ["*"], "routes": [*prefix_routes, {
        "match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": "unknown service"}},
        "response_headers_to_add": [{"header": {"key": "x-riprap-reason", "value": "unknown-service"}}]}]})
    listener = {
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": "riprap",
        "address": {"socket_address": {"address": ports.listen_host, "port_value": ports.listen_port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": {
            "@type": HCM, "stat_prefix": "riprap",
            "route_config": {"name": "riprap", "virtual_hosts": vhosts},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}
    return Config(boot, {"cds.yaml": {"resources": clusters}, "lds.yaml": {"resources": [listener]}})


COMPILER = (build_config, cluster_name, Ports)
