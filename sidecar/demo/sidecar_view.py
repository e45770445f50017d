"""What the running sidecar says about itself, read from its admin port.

`/metrics` (Prometheus text, names documented in docs/metrics.md) gives the counters the
demo shows: retries, hedges, fallbacks, ejections, breaker states, endpoint health;
`/state` the endpoints ejected right now.
Reading them from the admin port, rather than from inside, keeps the demo honest: it sees
exactly what an operator's Prometheus would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

BREAKER_NAMES = {0.0: "closed", 1.0: "half-open", 2.0: "open"}


@dataclass
class SidecarView:
    ready: bool = False
    retries: dict[str, float] = field(default_factory=dict)  # service -> count
    hedges: dict[str, float] = field(default_factory=dict)
    retries_refused: dict[tuple[str, str], float] = field(default_factory=dict)  # (service, why)
    fallbacks: dict[tuple[str, str], float] = field(default_factory=dict)  # (service, kind)
    ejections: dict[tuple[str, str], float] = field(default_factory=dict)  # (service, endpoint)
    breakers: dict[str, str] = field(default_factory=dict)  # "service" or "service/shard" -> state
    breaker_opens: dict[str, float] = field(default_factory=dict)
    unhealthy: list[str] = field(default_factory=list)  # "service endpoint"
    ejected_now: list[str] = field(default_factory=list)  # "service endpoint", from /state
    error: str | None = None

    def total(self, what: dict) -> float:  # type: ignore[type-arg]
        return float(sum(what.values()))


def parse_metrics(text: str) -> SidecarView:
    view = SidecarView(ready=True)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            lb, v = s.labels, s.value
            if s.name == "riprap_retries_total":
                view.retries[lb.get("service", "?")] = v
            elif s.name == "riprap_retries_refused_total":
                view.retries_refused[(lb.get("service", "?"), lb.get("why", "?"))] = v
            elif s.name == "riprap_hedges_total":
                view.hedges[lb.get("service", "?")] = v
            elif s.name == "riprap_fallbacks_total":
                view.fallbacks[(lb.get("service", "?"), lb.get("kind", "?"))] = v
            elif s.name == "riprap_ejections_total":
                view.ejections[(lb.get("service", "?"), lb.get("endpoint", "?"))] = v
            elif s.name == "riprap_breaker_state":
                key = lb.get("service", "?")
                if lb.get("shard") not in (None, "", "none", "-"):
                    key += "/" + lb["shard"]
                view.breakers[key] = BREAKER_NAMES.get(v, str(v))
            elif s.name == "riprap_breaker_transitions_total" and lb.get("state") == "open":
                key = lb.get("service", "?")
                if lb.get("shard") not in (None, "", "none", "-"):
                    key += "/" + lb["shard"]
                view.breaker_opens[key] = v
            elif s.name == "riprap_endpoint_healthy" and v < 0.5:
                view.unhealthy.append(f"{lb.get('service', '?')} {lb.get('endpoint', '?')}")
    return view


def ejected_endpoints(state: Any) -> list[str]:
    """Endpoints `/state` shows as ejected right now, services and shards alike."""
    out: list[str] = []
    services = state.get("services", {}) if isinstance(state, dict) else {}
    for name, svc in services.items():
        if not isinstance(svc, dict):
            continue
        scopes = [svc] + [s for s in (svc.get("shards") or {}).values() if isinstance(s, dict)]
        for scope in scopes:
            for ep in scope.get("endpoints") or []:
                if isinstance(ep, dict) and ep.get("ejected"):
                    out.append(f"{name} {ep.get('url', '?')}")
    return sorted(out)


async def scrape(session: aiohttp.ClientSession, admin: str) -> SidecarView:
    """One look at the sidecar; a view with `error` set when it does not answer."""
    timeout = aiohttp.ClientTimeout(total=1.0)
    try:
        async with session.get(f"http://{admin}/metrics", timeout=timeout) as resp:
            if resp.status != 200:
                return SidecarView(error=f"/metrics answered {resp.status}")
            view = parse_metrics(await resp.text())
        async with session.get(f"http://{admin}/state", timeout=timeout) as resp:
            if resp.status == 200:
                view.ejected_now = ejected_endpoints(await resp.json(content_type=None))
        return view
    except (aiohttp.ClientError, TimeoutError) as exc:
        return SidecarView(error=type(exc).__name__)
    except ValueError as exc:  # unparsable exposition text or JSON
        return SidecarView(error=f"bad admin answer: {exc}")
