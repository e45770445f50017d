"""`riprap run FILE --engine envoy`: Envoy is the data plane, riprap the control plane.

riprap keeps what the Python engine's sidecar does around the calls: compiling FILE and
hot-reloading it, the admin endpoints on the plan's `admin` address (`/healthz /readyz
/plan /state /metrics`, same shapes and metric names), supervision of the app (section 6)
and of Envoy itself. Calls never pass through this process: they go to Envoy's listener
on `listen`.

`EnvoyEngine` is what the plan holder (`sidecar.reload.PlanHolder`) sees as the running
engine: `update(plan)` compiles the new plan to Envoy configuration, has Envoy validate it
and swaps the files (`reload.ConfigSwapper`), or raises with Envoy's own message and
changes nothing; `snapshot()` reads Envoy's admin API into riprap's `/state` shape.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import importlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, cast

import httpx
import uvicorn

from dsl.plan import Plan
from sidecar.engines.envoy.admin import EnvoyState, EnvoyStats, fill_metrics, parse_clusters, \
    parse_prometheus
from sidecar.engines.envoy.process import EnvoyError, EnvoyProcess, EnvoyRejected, \
    EnvoyStartError, find_envoy
from sidecar.engines.envoy.reload import ConfigLike, ConfigSwapper, split_routes
from sidecar.metrics import SidecarMetrics

log = logging.getLogger("riprap.envoy")

# The Envoy statistics admin.py reads (Envoy's dotted names): the rest are not fetched.
STATS_USED = (r"(upstream_rq_(time|retry|retry_overflow|active|pending_active|pending_overflow|active_overflow"
              r"|completed|[1-5]xx)|ejections_enforced_total|downstream_rq_active"
              r"|rate_limited)$")
OUTLIER_LOG = "outlier-events.log"
STATE_HOST = "_riprap"  # the compiler's Host for riprap's own questions (not a service name)
Builder = Callable[..., ConfigLike]  # build_config(plan, ports, *, dynamic_dir, chaos)
ClusterNameFn = Callable[[str, "str | None"], str]


def default_compiler() -> tuple[Builder, ClusterNameFn, Any]:
    """The Envoy back end (`config.py`): build_config, cluster_name and EnvoyPorts."""
    from sidecar.engines.envoy import config  # type: ignore[attr-defined,unused-ignore]

    return config.build_config, config.cluster_name, config.EnvoyPorts


def _event_time(stamp: Any) -> float:
    """An outlier event's `timestamp` (RFC 3339, UTC) as wall-clock seconds; now if unreadable."""
    try:
        return datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


def split_address(addr: str) -> tuple[str, int]:
    from sidecar.server import parse_address

    return parse_address(addr)


class EnvoyEngine:
    """One Envoy, its live configuration files and its admin API, for one plan at a time."""

    def __init__(self, plan: Plan, *, binary: str, listen: str, chaos: bool = False,
                 concurrency: int = 1, drain_time: float = 2.0,
                 compiler: tuple[Builder, ClusterNameFn, Any] | None = None,
                 run_dir: Path | None = None, log_level: str = "warning",
                 environ: dict[str, str] | None = None) -> None:
        self.plan = plan
        self.environ = environ  # whose OTEL_* variables ask for tracing (None: no tracing)
        self.binary = binary
        self.chaos = chaos
        self.concurrency = concurrency
        self.drain_time = drain_time
        self.log_level = log_level
        self.build_config, self.cluster_name, ports_cls = compiler or default_compiler()
        host, port = split_address(listen)
        self.ports = ports_cls(listen_host=host, listen_port=port, admin_port=0)
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="riprap-envoy-"))
        self._own_dir = run_dir is None
        self.dynamic_dir = self.run_dir / "dynamic"
        self.swapper = ConfigSwapper(binary, self.run_dir, self.dynamic_dir)
        self.process: EnvoyProcess | None = None
        self.config: ConfigLike | None = None
        self.state = EnvoyState(self.cluster_name)
        self.notes: tuple[Any, ...] = ()
        self.reload_lock = asyncio.Lock()
        self.ratelimit: Any = None  # riprap's gRPC rate limit service, for `shared` limits
        self.stats = EnvoyStats()  # the last read of Envoy's admin API
        # Envoy's outlier event log: per-host ejections (its stats count them per cluster)
        self.outlier_log = self.run_dir / OUTLIER_LOG
        self._outlier_pos = 0
        self._outlier_rest = b""
        self._ejected: dict[tuple[str, str], int] = {}
        self._ejected_since: dict[tuple[str, str], tuple[float, int]] = {}

    # -- shared limits ------------------------------------------------------------------
    async def _ensure_ratelimit(self, plan: Plan) -> None:
        """Start the rate limit service Envoy asks about `limit ... shared` (once needed).

        It lives in this process (`sidecar.ratelimit_service`, backed by the plan's
        `store`) on a loopback port that goes into the configuration; without it the
        compiler falls back to a local bucket and says so.
        """
        if self.ratelimit is not None or not uses_shared_limits(plan):
            return
        try:
            rls_mod = importlib.import_module("sidecar.ratelimit_service")
            store_mod = importlib.import_module("policies.store")
        except ImportError as exc:
            log.warning("shared limits: the rate limit service is not available (%s); "
                        "each Envoy enforces a local bucket", exc)
            return
        service = rls_mod.RateLimitService(lambda: self.plan, store_mod.StoreHub(), 0)
        port = await service.start()
        self.ratelimit = service
        self.ports = dataclasses.replace(self.ports, ratelimit_port=int(port))

    # -- building -----------------------------------------------------------------------
    def build(self, plan: Plan) -> ConfigLike:
        """Plan -> Envoy configuration (pure; runs in a worker thread on reloads)."""
        extra = {"environ": self.environ} if self.environ is not None else {}
        config = self.build_config(plan, self.ports, dynamic_dir=self.dynamic_dir,
                                   chaos=self.chaos, **extra)
        config.bootstrap.setdefault("cluster_manager", {})["outlier_detection"] = {
            "event_log_path": str(self.outlier_log)}
        return split_routes(config, self.dynamic_dir)

    async def prepare(self) -> ConfigLike:
        """Build and validate the first configuration and write it (Envoy not started yet)."""
        await self._ensure_ratelimit(self.plan)
        config = await asyncio.to_thread(self.build, self.plan)
        await self.swapper.validate(config)
        self.swapper.write_initial(config)
        self.config = config
        self.notes = tuple(getattr(config, "notes", ()))
        return config

    async def start(self) -> None:
        """Start Envoy on the prepared configuration; raises EnvoyStartError."""
        if self.config is None:
            await self.prepare()
        listeners = sum(1 for doc in self.swapper.current.values()
                        for r in doc.get("resources", ())
                        if r.get("@type", "").endswith("listener.v3.Listener"))
        self.process = EnvoyProcess(self.binary, self.run_dir / "envoy.json", self.run_dir,
                                    concurrency=self.concurrency, drain_time=self.drain_time,
                                    log_level=self.log_level,
                                    expected_listeners=max(1, listeners))
        self.swapper.process = self.process
        await self.process.start()

    # -- the PlanHolder's engine interface ------------------------------------------------
    async def update(self, plan: Plan) -> None:
        """Hot reload: build, validate, swap. Raises (Envoy's message) and changes nothing
        when Envoy refuses the new configuration."""
        async with self.reload_lock:
            t0 = time.monotonic()
            await self._ensure_ratelimit(plan)
            config = await asyncio.to_thread(self.build, plan)
            t1 = time.monotonic()
            await self.swapper.validate(config)
            t2 = time.monotonic()
            if self.config is not None and config.bootstrap != self.config.bootstrap:
                log.warning("the new plan changes Envoy's bootstrap (listen address, admin or "
                            "rate limit service); that part takes effect on restart")
            await self.swapper.swap(config)
            log.debug("envoy: configuration built in %.0f ms, validated in %.0f ms, in force "
                     "after %.0f ms more", (t1 - t0) * 1000, (t2 - t1) * 1000,
                     (time.monotonic() - t2) * 1000)
            self.config = config
            old = {(n.service, n.statement) for n in self.notes}
            self.notes = tuple(getattr(config, "notes", ()))
            for n in self.notes:
                if (n.service, n.statement) not in old:
                    log.warning("%s", format_note(n))
            self.plan = plan

    async def scrape(self) -> EnvoyStats:
        assert self.process is not None
        # A stats request merges the workers' histograms (stats_flush_on_admin), which
        # the next one shows: ask for one cheap stat first.
        await self.process.admin_get("/stats", params={"filter": "^server\\.uptime$"})
        prom = await self.process.admin_get("/stats/prometheus",
                                            params={"usedonly": "", "filter": STATS_USED})
        clusters = await self.process.admin_get("/clusters", params={"format": "json"})
        stats = parse_clusters(clusters.json(), parse_prometheus(prom.text))
        specs: list[Any] = [sp for svc in self.plan.services.values() for sp in (svc, *svc.shards)]
        if any(spec.breaker is not None for spec in specs):
            stats.breakers = await self._breakers()
        if any(spec.fallbacks or spec.hedge is not None or spec.limit is not None
               or (spec.retry is not None and spec.retry.budget is not None) for spec in specs):
            stats.counters = await self._breakers("/counters")
        stats.ejected = self._read_ejections()  # every endpoint has a count, as on Python
        stats.ejected_since = dict(self._ejected_since)
        return stats

    def _read_ejections(self) -> dict[tuple[str, str], int]:
        """Ejections per (cluster, host address) so far: the outlier event log's new lines
        (one JSON object each, `action` EJECT and `enforced` for an ejection)."""
        try:
            with open(self.outlier_log, "rb") as f:
                f.seek(self._outlier_pos)
                data = f.read(1 << 20)
        except OSError:
            return dict(self._ejected)
        self._outlier_pos += len(data)
        lines = (self._outlier_rest + data).split(b"\n")
        self._outlier_rest = lines.pop()
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            key = (str(event.get("cluster_name", "")), str(event.get("upstream_url", "")))
            if event.get("action") == "EJECT" and event.get("enforced"):
                self._ejected[key] = self._ejected.get(key, 0) + 1
                self._ejected_since[key] = (_event_time(event.get("timestamp")),
                                            int(event.get("num_ejections") or 1))
            elif event.get("action") == "UNEJECT":
                self._ejected_since.pop(key, None)
        return dict(self._ejected)

    async def _breakers(self, path: str = "/breakers") -> dict[str, dict[str, Any]] | None:
        """The Lua filter's breakers (`GET /breakers` with Host `_riprap` on the listener),
        or its counters of fallbacks, stale copies and hedges (`/counters`); one Envoy worker: one
        table. None when this configuration has no such route."""
        assert self.process is not None
        host = self.ports.listen_host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        url = f"http://{'[' + host + ']' if ':' in host else host}:{self.ports.listen_port}{path}"
        try:
            resp = await self.process.client.get(url, headers={"Host": STATE_HOST}, timeout=1.0)
        except httpx.HTTPError:
            return None
        if resp.status_code != 200 or "json" not in resp.headers.get("content-type", ""):
            return None
        doc = resp.json()
        return doc if isinstance(doc, dict) else None

    async def refresh(self) -> EnvoyStats:
        """Read Envoy's admin API now (what `/state` and `/metrics` answer from)."""
        stats = EnvoyStats()
        if self.process is not None and self.process.ready:
            try:
                stats = await self.scrape()
            except (httpx.HTTPError, EnvoyError, ValueError) as exc:
                log.debug("envoy scrape failed: %s", exc)
        self.stats = stats
        return stats

    def snapshot(self) -> dict[str, Any]:
        """`/state`'s `services` from the last read of Envoy (`refresh`); endpoints have no
        Envoy-side state while it is down."""
        snap = self.state.snapshot(self.plan, self.stats)
        snap["envoy"] = self.process.snapshot() if self.process is not None else None
        if self.ratelimit is not None:
            rls = snap["ratelimit"] = self.ratelimit.snapshot()
            snap["store"] = rls["store"]  # where the Python engine shows it
            # A shared limit is enforced by the rate limit service, not Envoy's local
            # filter: its limiter is the service's (store up/down, sidecars, limited), in
            # the Python engine's shape.
            for name, limiter in rls["limits"].items():
                service = snap["services"].get(name)
                if service is not None and "limiter" in service:
                    service["limiter"] = limiter
        return snap

    def store_status(self) -> tuple[bool | None, dict[str, int]]:
        """For `riprap_store_up` / `riprap_store_errors`: the rate limit service's store."""
        if self.ratelimit is None:
            return None, {}
        status: tuple[bool | None, dict[str, int]] = self.ratelimit.hub.status()
        return status

    async def aclose(self) -> None:
        if self.process is not None:
            await self.process.stop()
        if self.ratelimit is not None:
            await self.ratelimit.stop()
            self.ratelimit = None
        if self._own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


class EnvoyMetrics(SidecarMetrics):
    """The sidecar's metrics, with the per-call series read from Envoy at scrape time."""

    def __init__(self) -> None:
        super().__init__()
        self.engine: EnvoyEngine | None = None
        self._in_flight = 0.0
        self.in_flight_source = lambda: self._in_flight

    async def refresh(self) -> None:
        engine = self.engine
        if engine is None:
            return
        stats = await engine.refresh()
        state = engine.snapshot()  # with the shared limiters of the rate limit service
        fill_metrics(self, engine.plan, stats, state, engine.cluster_name)
        self._in_flight = sum(v for lab, v in stats.samples.get("envoy_http_downstream_rq_active", ())
                              if lab.get("envoy_http_conn_manager_prefix") != "admin")

    async def poll(self, interval: float = 1.0) -> None:
        """Keep the series fresh for the dashboard, which samples them once a second."""
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - reading Envoy must never stop riprap
                log.debug("envoy metrics poll failed", exc_info=True)
            await asyncio.sleep(interval)


def uses_shared_limits(plan: Plan) -> bool:
    specs: list[Any] = [s for svc in plan.services.values() for s in (svc, *svc.shards)]
    return any(spec.limit is not None and spec.limit.shared for spec in specs)


def format_note(note: Any, path: str | None = None, spans: dict[str, Any] | None = None) -> str:
    """One approximation warning, worded as `compile --target envoy` and `check --engine
    envoy` word it: where the service is, the statement, and what differs."""
    span = (spans or {}).get(note.service)
    at = f"{path}:{span.line}:{span.col}" if path and span else (path or "riprap")
    return f"{at}: warning[envoy]: service {note.service}: {note.statement}: {note.differs}"


def service_spans(path: str) -> dict[str, Any]:
    """Where each service is declared in a `.riprap` file (none for a plan `.json`)."""
    try:
        from dsl.loader import load_plan_source

        return dict(getattr(load_plan_source(path), "service_spans", None) or {})
    except Exception:  # noqa: BLE001 - positions only make warnings nicer
        return {}


# -- the command ----------------------------------------------------------------------------

def _admin_config(app: Any) -> uvicorn.Config:
    return uvicorn.Config(app, http="httptools", ws="none", lifespan="off", access_log=False,
                          log_config=None, server_header=False, timeout_keep_alive=5,
                          timeout_graceful_shutdown=1)


class _AdminServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


def _check_free(addr: str) -> None:
    """Fail early, with riprap's wording, when the listen address is taken."""
    from sidecar.server import bind

    bind(addr).close()


def run(args: argparse.Namespace) -> int:
    """`riprap run FILE --engine envoy`; exit codes as the Python engine's."""
    from sidecar.reload import PlanLoadError, compile_source
    from sidecar.server import AddressError, run_forever

    if not os.path.isfile(args.file):
        print(f"riprap run: error: cannot read {args.file}: no such file", file=sys.stderr)
        return 2
    try:
        binary = find_envoy(getattr(args, "envoy", None))
    except EnvoyError as exc:
        print(f"riprap run: error: {exc}", file=sys.stderr)
        return 2
    try:
        compiler = default_compiler()
    except ImportError as exc:
        print(f"riprap run: error: the Envoy back end is not available: {exc}", file=sys.stderr)
        return 2
    path = os.path.abspath(args.file)
    try:
        plan, warnings = compile_source(path)
    except PlanLoadError as exc:
        print(exc.text, file=sys.stderr)
        n = sum(1 for d in exc.diagnostics if d.is_error)
        print(f"riprap run: {args.file}: {n} error{'s' if n != 1 else ''}; not started",
              file=sys.stderr)
        return 1
    try:
        return run_forever(lambda: _serve(args, binary, plan, warnings, path, compiler))
    except AddressError as exc:
        print(f"riprap run: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled below
        return 0


async def _serve(args: argparse.Namespace, binary: str, plan: Plan, warnings: list[Any],
                 path: str, compiler: tuple[Builder, ClusterNameFn, Any]) -> int:
    from sidecar.admin import create_admin_app
    from sidecar.reload import PlanHolder
    from sidecar.server import bind
    from sidecar.supervisor import Supervisor

    listen = args.listen or plan.listen
    if getattr(args, "access_log", False):
        log.warning("--access-log: the Envoy engine writes no access log of its own (the calls "
                    "do not pass through riprap); use Envoy's access log in a compiled config")
    admin_sock = bind(args.admin or plan.admin)
    try:
        _check_free(listen)
    except Exception:
        admin_sock.close()
        raise
    engine = EnvoyEngine(plan, binary=binary, listen=listen, chaos=args.chaos,
                         drain_time=max(0.0, args.grace), compiler=compiler,
                         log_level="debug" if args.log_level == "debug" else "warning",
                         environ=dict(os.environ))
    try:
        try:
            await engine.prepare()
        except EnvoyRejected as exc:
            print(f"riprap run: error: Envoy refused the configuration: {exc}", file=sys.stderr)
            return 2
        _log_tracing(plan.app)
        spans = service_spans(path)
        for note in engine.notes:
            print(format_note(note, args.file, spans), file=sys.stderr)
        try:
            await engine.start()
        except EnvoyStartError as exc:
            print(f"riprap run: error: {exc}", file=sys.stderr)
            return 2
    except BaseException:
        admin_sock.close()
        await engine.aclose()
        raise
    metrics = EnvoyMetrics()
    metrics.engine = engine
    metrics.store_source = engine.store_status  # riprap_store_up, riprap_store_errors
    supervisor: list[Supervisor | None] = [None]

    def supervise_changed(new: Plan) -> None:
        if args.no_supervise:
            return
        sup = supervisor[0]
        if new.supervise is None:
            if sup is not None:
                supervisor[0] = None
                asyncio.get_running_loop().create_task(sup.stop())
        elif sup is None:
            sup = supervisor[0] = Supervisor(new.app, new.supervise, metrics)
            sup.start()
        else:
            sup.update(new.supervise)

    # The holder drives any engine with update()/snapshot(); it is typed for the Python one.
    holder = PlanHolder(plan, cast(Any, engine), metrics, source_path=path, warnings=warnings,
                        on_supervise_change=supervise_changed)
    listeners = {"proxy": f"http://{listen}", "admin": _name(admin_sock)}

    def extra_state() -> dict[str, Any]:
        sup = supervisor[0]
        return {"app": sup.snapshot() if sup else None, "listeners": listeners,
                "engine": "envoy"}

    def not_ready() -> str | None:
        proc = engine.process
        return None if proc is not None and proc.ready else "envoy-down"

    admin_app = create_admin_app(holder, metrics, extra_state, ready=not_ready)
    dashboard = getattr(admin_app.state, "dashboard", None)
    server = _AdminServer(_admin_config(admin_app))
    loop = asyncio.get_running_loop()
    term = asyncio.Event()
    hurry = asyncio.Event()
    signals = [0]

    def on_term() -> None:
        signals[0] += 1
        if signals[0] == 1:
            log.info("shutdown requested: readiness is now 503; Envoy drains its listeners")
        else:
            hurry.set()
        holder.draining = True
        metrics.draining = True
        term.set()

    def on_hup() -> None:
        log.info("SIGHUP: reloading the plan")
        loop.create_task(holder.reload("SIGHUP"))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_term)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    admin_task = loop.create_task(server.serve(sockets=[admin_sock]))
    poller = loop.create_task(metrics.poll())
    if dashboard is not None:
        dashboard.start()  # samples the metrics once a second for GET /
    holder.start_watching()
    if not args.no_supervise and plan.supervise is not None:
        first = supervisor[0] = Supervisor(plan.app, plan.supervise, metrics)
        first.start()
    assert engine.process is not None
    log.info("riprap (engine envoy): app %s, plan %s; Envoy on %s, admin on %s",
             plan.app, holder.digest[:12], listen, listeners["admin"])
    try:
        stop = loop.create_task(term.wait())
        done, _ = await asyncio.wait({stop, admin_task}, return_when=asyncio.FIRST_COMPLETED)
        if stop not in done:
            stop.cancel()
            log.error("the admin listener stopped unexpectedly; shutting down")
            holder.draining = True
        started = time.monotonic()
        drain = loop.create_task(engine.process.drain(max(0.0, args.drain_timeout)))
        hurried = loop.create_task(hurry.wait())
        await asyncio.wait({drain, hurried}, return_when=asyncio.FIRST_COMPLETED)
        hurried.cancel()
        if not drain.done():
            drain.cancel()
        log.info("envoy drained (%.1f s)", time.monotonic() - started)
    finally:
        poller.cancel()
        if dashboard is not None:
            await dashboard.stop()
        await holder.stop_watching()
        sup = supervisor[0]
        if sup is not None:
            await sup.stop()
        await engine.aclose()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await admin_task
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("riprap stopped")
    return 0


def _log_tracing(app: str) -> None:
    """Say where Envoy sends its spans, as the Python engine does (tracing.py)."""
    from sidecar.engines.envoy.tracing import tracing_from_env

    traced = tracing_from_env(app)
    if traced is not None:
        log.info("tracing: Envoy exports spans over OTLP/HTTP to %s (service.name %s)",
                 traced.url, traced.service_name)


def _name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"
