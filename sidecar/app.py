"""create_app: one sidecar = a plan holder, a transport, two ASGI apps and a supervisor.

The proxy app (raw ASGI, hot path) and the admin app (Starlette) share one
`ResilientTransport`, one `PlanHolder` and one metrics registry. `create_app` works without
sockets too: tests drive `sidecar.proxy` with `httpx.ASGITransport` and pass an `inner`
transport (`httpx.MockTransport`) to stand in for the network.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field
from typing import Any

import httpx

from dsl.diagnostics import Diagnostic
from dsl.plan import Plan
from policies.clock import Clock
from sidecar.admin import create_admin_app
from sidecar.logs import AccessLog, AccessObserver
from sidecar.metrics import FanoutObserver, SidecarMetrics
from sidecar.proxy import ProxyApp
from sidecar.reload import PlanHolder, compile_source
from sidecar.supervisor import Supervisor
from sidecar.tracing import OtelTracer, tracer_from_env


@dataclass
class Sidecar:
    """A running sidecar's parts. `start()` before serving, `aclose()` after."""

    holder: PlanHolder
    metrics: SidecarMetrics
    proxy: ProxyApp
    admin: Any  # Starlette
    chaos: bool
    watch: bool
    supervise: bool
    supervisor: Supervisor | None = None
    warnings: list[Diagnostic] = field(default_factory=list)
    listeners: dict[str, str] = field(default_factory=dict)  # set by the server: the real URLs
    tracer: OtelTracer | None = None  # OpenTelemetry, when the OTEL_* variables ask for it

    @property
    def transport(self) -> Any:
        return self.holder.transport

    async def start(self) -> None:
        await self.holder.transport.start()
        self.admin.state.dashboard.start()  # samples the metrics once a second for GET /
        if self.watch:
            self.holder.start_watching()
        plan = self.holder.plan
        if self.supervise and plan.supervise is not None:
            self.supervisor = Supervisor(plan.app, plan.supervise, self.metrics)
            self.supervisor.start()

    def _supervise_changed(self, plan: Plan) -> None:
        if not self.supervise:
            return
        if plan.supervise is None:
            if self.supervisor is not None:
                sup, self.supervisor = self.supervisor, None
                asyncio.get_running_loop().create_task(sup.stop())
            return
        if self.supervisor is None:
            self.supervisor = Supervisor(plan.app, plan.supervise, self.metrics)
            self.supervisor.start()
        else:
            self.supervisor.update(plan.supervise)

    def extra_state(self) -> dict[str, Any]:
        from policies.aiohttp_transport import active_fast_paths as upstream_paths
        from sidecar.uvicorn_compat import active_fast_paths as client_paths

        return {"app": self.supervisor.snapshot() if self.supervisor else None,
                "listeners": self.listeners,
                "fast_paths": {**upstream_paths(), **client_paths()}}

    async def aclose(self) -> None:
        await self.admin.state.dashboard.stop()
        await self.holder.stop_watching()
        if self.supervisor is not None:
            await self.supervisor.stop()
        await self.holder.transport.aclose()
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)  # flush the last spans


def create_app(source: str | os.PathLike[str] | Plan, *, chaos: bool = False,
               inner: httpx.AsyncBaseTransport | None = None, access_log: bool = False,
               watch: bool = True, supervise: bool = True,
               rng: random.Random | None = None, clock: Clock | None = None) -> Sidecar:
    """Build a sidecar from a policy file, a plan `.json`, or a `Plan` object.

    `clock` and `rng` drive the engine's decisions (tests pass a virtual clock, so
    backoffs, deadlines, breaker windows and hedges run in virtual time).

    Raises `sidecar.reload.PlanLoadError` (with diagnostics) when the file does not
    compile. A `Plan` object is served as is and never reloaded.
    """
    from policies.transport import ResilientTransport

    warnings: list[Diagnostic] = []
    if isinstance(source, Plan):
        plan, path = source, None
    else:
        path = os.path.abspath(os.fspath(source))
        plan, warnings = compile_source(path)
    metrics = SidecarMetrics()
    access = AccessLog() if access_log else None
    observer: Any = FanoutObserver(metrics, AccessObserver()) if access_log else metrics
    if inner is None:
        from policies.aiohttp_transport import AiohttpTransport

        inner = AiohttpTransport()
    from sidecar.upgrade import UpgradeTransport  # WebSocket handshakes on their own connection

    tracer = tracer_from_env(plan.app)  # None unless OTEL_EXPORTER_OTLP_*ENDPOINT is set
    transport = ResilientTransport(plan, UpgradeTransport(inner), observer=observer, chaos=chaos,
                                   rng=rng, tracer=tracer, clock=clock)
    metrics.store_source = transport.store_status  # riprap_store_up, riprap_store_errors_total
    holder = PlanHolder(plan, transport, metrics, source_path=path, warnings=warnings)
    proxy = ProxyApp(holder, metrics, access)
    sidecar = Sidecar(holder=holder, metrics=metrics, proxy=proxy, admin=None, chaos=chaos,
                      watch=watch and path is not None, supervise=supervise,
                      warnings=warnings)
    sidecar.tracer = tracer
    holder.on_supervise_change = sidecar._supervise_changed
    sidecar.admin = create_admin_app(holder, metrics, sidecar.extra_state)
    return sidecar
