"""What the back end compiles: a service, or each shard of a sharded service, as one unit.

A unit is one Envoy cluster and the routes that lead to it. A shard plan already carries
the service's policies with its own on top (the compiler resolved them), so a unit
reads every field from one spec.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from dsl.plan import EndpointSpec, Plan, ServicePlan, ShardPlan
from sidecar.engines.envoy.names import cluster_name


@dataclass(frozen=True)
class Unit:
    service: ServicePlan
    spec: ServicePlan | ShardPlan  # where the policies are read from
    shard: str | None = None

    @property
    def cluster(self) -> str:
        return cluster_name(self.service.name, self.shard)

    @property
    def label(self) -> str:
        """How notes name it: `payments` or `inventory shard a`."""
        return self.service.name if self.shard is None else f"{self.service.name} shard {self.shard}"


# Header names reach the upstream (and answers the app) in the case they were sent in, as
# bytes (section 9, faithful forwarding): Envoy's HTTP/1 codec lower-cases them otherwise.
PRESERVE_CASE = {"stateful_formatter": {
    "name": "envoy.http.stateful_header_formatters.preserve_case",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.http.header_formatters."
                              "preserve_case.v3.PreserveCaseFormatterConfig"},
}}


def retries_resets(unit: Unit) -> bool:
    """Does the unit's retry policy use Envoy's `reset` condition (riprap's `reset` or
    `timeout`)? Envoy retries an upstream protocol error, such as an answer head over the
    codec's bounds, under it: those units check riprap's head bounds in the Lua filter."""
    r = unit.spec.retry
    return r is not None and ("reset" in r.on or "timeout" in r.on)


def units_of(service: ServicePlan) -> list[Unit]:
    if service.shards:
        return [Unit(service, shard, shard.name) for shard in service.shards]
    return [Unit(service, service)]


def all_units(plan: Plan) -> list[Unit]:
    return [u for name in sorted(plan.services) for u in units_of(plan.services[name])]


@dataclass(frozen=True)
class Target:
    """An endpoint URL taken apart."""

    scheme: str
    host: str  # without brackets
    port: int
    path: str  # the endpoint's own path prefix, "" for none ("/" counts as none)

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def target(endpoint: EndpointSpec) -> Target:
    parts = urlsplit(endpoint.url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    path = parts.path.rstrip("/")
    return Target(scheme, parts.hostname or "", port, path)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def duration(seconds: float) -> str:
    """Envoy's JSON duration (`1.5s`), to the microsecond, never zero."""
    us = max(1, round(seconds * 1_000_000))
    whole, frac = divmod(us, 1_000_000)
    return f"{whole}s" if frac == 0 else f"{whole}.{frac:06d}".rstrip("0") + "s"


def uses_service_fallback(plan: Plan) -> bool:
    """Whether a unit resends failed calls to another service (Envoy needs its own listener as a cluster)."""
    return any(fb.kind == "service" for u in all_units(plan) for fb in u.spec.fallbacks)


def resends(plan: Plan) -> bool:
    """Whether a unit retries or hedges: then Envoy runs the upstream Lua filter on every
    attempt, which waits between attempts through Envoy's own listener (`/sleep`)."""
    return any(u.spec.retry is not None or u.spec.hedge is not None for u in all_units(plan))


__all__ = ["PRESERVE_CASE", "Target", "Unit", "all_units", "duration", "is_ip", "resends", "retries_resets", "target", "units_of",
           "uses_service_fallback"]
