"""The admin listener (contract section 9): /healthz /readyz /metrics /plan /state, and the
dashboard (`GET /`, its data at `GET /dashboard.json`: sidecar/dashboard/).

Starlette is fine here: these routes are not on the hot path. `/state` is the engine's
own snapshot (`ResilientTransport.snapshot()`: health, ejection, breaker, limiter, bulkhead
and budget of every service, shard and endpoint) plus the sidecar's (draining, reloads,
supervised app).
"""

from __future__ import annotations

from typing import Any, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.dashboard import DashboardModel, dashboard_routes
from sidecar.metrics import SidecarMetrics
from sidecar.reload import PlanHolder


def create_admin_app(holder: PlanHolder, metrics: SidecarMetrics,
                     extra_state: Callable[[], dict[str, Any]] | None = None,
                     dashboard: DashboardModel | None = None,
                     ready: Callable[[], str | None] | None = None) -> Starlette:
    """The admin ASGI app over one plan holder (and the dashboard drawn from the same state).

    `ready`: why the sidecar cannot serve right now (e.g. the Envoy engine's `envoy-down`),
    or None. An engine or metrics object with an async `refresh()` (the Envoy engine reads
    both from another process) is refreshed before `/state` or `/metrics` answers.
    """

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if holder.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        why = ready() if ready is not None else None
        if why is not None:
            return JSONResponse({"status": why}, status_code=503)
        return JSONResponse({"status": "ready", "hash": holder.digest})

    async def metrics_route(request: Request) -> Response:
        refresh = getattr(metrics, "refresh", None)
        if refresh is not None:
            await refresh()
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    async def plan(request: Request) -> Response:
        await holder.settled()
        return JSONResponse(holder.plan_document())

    def state_document() -> dict[str, Any]:
        snap: Any = holder.transport.snapshot()
        doc: dict[str, Any] = {
            "services": snap.get("services", snap) if isinstance(snap, dict) else snap,
            "sidecar": {
                "draining": holder.draining,
                "hash": holder.digest,
                "reloads": holder.reloads,
                "last_error": holder.last_error is not None,
            },
        }
        if isinstance(snap, dict):
            for key, value in snap.items():
                if key != "services":
                    doc.setdefault(key, value)
        if extra_state is not None:
            doc.update(extra_state())
        doc["sidecar"]["app"] = holder.plan.app
        return doc

    async def state(request: Request) -> Response:
        await holder.settled()
        refresh = getattr(holder.transport, "refresh", None)
        if refresh is not None:
            await refresh()
        return JSONResponse(state_document())

    if dashboard is None:
        dashboard = DashboardModel(metrics.registry.collect, state_document)

    routes = [
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET", "HEAD"]),
        Route("/metrics", metrics_route, methods=["GET", "HEAD"]),
        Route("/plan", plan, methods=["GET", "HEAD"]),
        Route("/state", state, methods=["GET", "HEAD"]),
        *dashboard_routes(dashboard),
    ]
    app = Starlette(routes=routes)
    app.state.dashboard = dashboard
    return app
