"""Active health checks: one loop per shard with a `health` line, every endpoint checked
on its own schedule (kept in the endpoint state, so a reload causes no burst of checks)."""

from __future__ import annotations

import asyncio
import logging

import httpx

from policies.endpoint import EndpointRuntime
from policies.health import ActiveHealth
from policies.stage import StageParts
from policies.timers import deadline_scope

log = logging.getLogger("riprap.policies")


async def run_health_checks(parts: StageParts, active: ActiveHealth) -> None:
    """Check every endpoint every `interval`; flip health on `fall`/`rise` in a row.
    The endpoint list is read afresh each round (it may be replaced at run time)."""
    assert parts.spec.health is not None
    spec = parts.spec.health
    clock = parts.env.clock
    pool = parts.pool
    while True:
        now = clock.now()
        endpoints = pool.endpoints
        due = [ep for ep in endpoints if active.due(ep.state, now)]
        if due:
            await asyncio.gather(*(check(parts, ep, active, spec.timeout) for ep in due))
        # state carried over a reload keeps its schedule: no burst of checks
        endpoints = pool.endpoints
        wake = min((ep.state.next_check for ep in endpoints), default=clock.now() + spec.interval)
        await clock.sleep(max(wake - clock.now(), 0.001))


async def check(parts: StageParts, ep: EndpointRuntime, active: ActiveHealth,
                timeout: float) -> None:
    """One check of one endpoint; the observer hears when its health flips."""
    spec = parts.spec.health
    assert spec is not None
    env = parts.env
    raw = spec.path if spec.path.startswith("/") else "/" + spec.path
    request = httpx.Request(spec.method, ep.url_for(raw.encode("ascii")),
                            headers=[(b"host", ep.authority),
                                     (b"user-agent", b"riprap-health")],
                            extensions=dict(ep.extensions))
    ok = False
    try:
        async with deadline_scope(env.clock, timeout):
            resp = await env.inner.handle_async_request(request)
            try:
                ok = active.expects(resp.status_code)
            finally:
                await resp.aclose()
    except (httpx.HTTPError, TimeoutError, OSError):
        ok = False
    except Exception as exc:  # noqa: BLE001 - a broken check is a failed check, not a dead loop
        log.warning("health check of %s failed: %r", ep.state.url, exc)
        ok = False
    if active.observe(ep.state, ok, env.clock.now()):
        env.observer.health_changed(parts.service, ep.state.url, ep.state.healthy)


__all__ = ["check", "run_health_checks"]
