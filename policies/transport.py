"""ResilientTransport: a whole riprap plan, enforced inside any httpx client.

    client = httpx.AsyncClient(transport=ResilientTransport(plan))
    await client.get("http://payments/charges/42")   # host "payments" = service payments

A transport that wraps a transport (httpx's `AsyncBaseTransport`, like failsafe-go's
`RoundTripper` wrapper): it picks the service (the `riprap.service` request extension,
else the URL's host), runs the service's policy chain (`policies.pipeline`) and sends
each attempt through the inner transport — by default `AiohttpTransport`, much cheaper
per request than httpx's own pool. The sidecar is a thin HTTP adapter around this class.

Hot reload is one reference swap: `update` builds the new `PlanRuntime` off the hot
path, carrying the state of what did not change, then replaces `self._runtime`; calls in
flight hold the runtime they started with and finish on it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import httpx

from dsl.plan import Plan
from policies.answers import error_response
from policies.clock import Clock, SystemClock
from policies.discovery import Discovery, Lookup, ResolvedLine
from policies.env import Env
from policies.errors import ATTEMPTS_HEADER, UnknownService
from policies.headers import set_header
from policies.observer import Observer
from policies.runtime import PlanRuntime, ServiceRuntime, ShardRuntime
from policies.safe_observer import SafeObserver
from policies.tracing import CURRENT_CALL, Tracer

log = logging.getLogger("riprap.transport")

SERVICE_EXTENSION = "riprap.service"
ATTEMPTS_BYTES = ATTEMPTS_HEADER.encode("ascii")


class ResilientTransport(httpx.AsyncBaseTransport):
    """Enforces `plan` on every request; answers riprap's own failures as HTTP responses.

    `inner` sends the attempts (default: a new `AiohttpTransport`, closed by `aclose`).
    `clock` and `rng` drive every decision (tests pass a virtual clock and a seeded
    random source). `observer` is told about calls, attempts, retries, hedges, breaker
    and health changes, ejections and rejections; its errors are swallowed. Chaos
    statements run only when `chaos` is True. `tracer` (`policies.tracing.Tracer`) gets a
    span per call and per attempt; without one, no tracing code runs.
    """

    def __init__(self, plan: Plan, inner: httpx.AsyncBaseTransport | None = None, *,
                 clock: Clock | None = None, rng: random.Random | None = None,
                 observer: Observer | None = None, chaos: bool = False,
                 tracer: Tracer | None = None) -> None:
        if not isinstance(plan, Plan):
            raise TypeError(
                f"ResilientTransport needs a compiled dsl.plan.Plan, not {type(plan).__name__}; "
                "compile_file(path).plan is None when the file has errors: see its .diagnostics")
        if inner is None:
            from policies.aiohttp_transport import AiohttpTransport

            inner = AiohttpTransport()
        self._env = Env(
            clock=clock if clock is not None else SystemClock(),
            rng=rng if rng is not None else random.Random(),
            observer=SafeObserver(observer),
            inner=inner,
            chaos=chaos,
            tracer=tracer,
        )
        self._runtime = PlanRuntime(plan, self._env)
        self._started = False
        self._closed = False
        self._health: dict[int, tuple[ShardRuntime, asyncio.Task[None]]] = {}
        # `resolve` lines: looked up before a plan goes live, then by a task per line
        self._discovery = Discovery(self._env.clock, self._dns_observed)
        self._starting: asyncio.Future[None] | None = None

    # -- the hot path ---------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self._started:  # the first call: start discovery and health checks
            await self.start()
        runtime = self._runtime  # one read: the whole call runs on this runtime
        name = request.extensions.get(SERVICE_EXTENSION)
        if name is None:
            name = runtime.service_for_host(request.url.host)
        service = runtime.services.get(name) if name is not None else None
        if service is None:
            shown = name if name is not None else request.url.host
            return error_response(UnknownService(shown, runtime.services))
        env = self._env
        if env.tracer is not None:
            return await self._traced_call(env.tracer, runtime, service, request)
        start = env.clock.now()
        # an incoming x-riprap-deadline-ms is read by the call context, on its header pass
        resp, attempts, outcome, fallback = await service.call(runtime, request, None,
                                                             start=start)
        set_header(resp.headers, ATTEMPTS_BYTES, str(attempts))  # headers[ATTEMPTS_HEADER] = ..
        env.observer.call_finished(service.name, outcome, resp.status_code, attempts,
                                   env.clock.now() - start, fallback)
        return resp

    async def _traced_call(self, tracer: Tracer, runtime: PlanRuntime, service: ServiceRuntime,
                           request: httpx.Request) -> httpx.Response:
        """`handle_async_request` with a call span current (only when tracing is on)."""
        env = self._env
        start = env.clock.now()
        deadline_ms = service.spec.timeout * 1000.0
        incoming = request.headers.get("x-riprap-deadline-ms")
        if incoming is not None and incoming.strip().isdigit():
            deadline_ms = min(deadline_ms, float(incoming.strip()))
        span = tracer.start_call(service.name, request.headers.raw, deadline_ms)
        token = CURRENT_CALL.set(span)
        try:
            resp, attempts, outcome, fallback = await service.call(runtime, request, None,
                                                                 start=start)
        except BaseException:
            span.end("cancelled", 499, 0, None, None)
            raise
        finally:
            CURRENT_CALL.reset(token)
        set_header(resp.headers, ATTEMPTS_BYTES, str(attempts))
        env.observer.call_finished(service.name, outcome, resp.status_code, attempts,
                                   env.clock.now() - start, fallback)
        span.end(outcome, resp.status_code, attempts, fallback, _breaker_state(service))
        return resp

    # -- the plan -------------------------------------------------------------------

    @property
    def plan(self) -> Plan:
        """The plan currently enforced."""
        return self._runtime.plan

    def service_for_host(self, host: str) -> str | None:
        """The service of the current plan a host names (name or `host` alias; case, port ignored)."""
        return self._runtime.service_for_host(host)

    async def update(self, plan: Plan) -> None:
        """Hot reload: build the new runtime (carrying unchanged state), then swap it in.

        A plan that cannot be built raises (ValueError with the reason) and leaves the
        running plan in force.
        """
        new = PlanRuntime(plan, self._env, previous=self._runtime)
        old = self._runtime
        live = self._started and not self._closed
        if live:  # the new lines' first lookups, before the plan goes live
            await self._prepare_lines(new)
        self._runtime = new
        old.release()  # a store no plan uses any more closes after a grace period
        if live:
            stopped = self._discovery.run([ln for _, ln in new.resolved_lines()],
                                          new.plan.resolver)
            await self._discovery.stop(stopped)
            await self._restart_health(old, new)

    def snapshot(self) -> dict[str, Any]:
        """JSON-able live state for `GET /state`.

        `{"services": {NAME: {...}}}` where each service has `hosts`, `stale_cache`, and
        either the fields of one shard (unsharded) or `limiter`/`bulkhead`/`budget`
        shared by its shards and `shards: {SHARD: {...}}`. A shard's fields:
        `endpoints` (url, weight, tier, in_flight, healthy, ejected, ejections,
        ejected_for, consecutive_failures), `breaker`, `limiter`, `bulkhead`, `budget`
        (each null when the policy is off) and `latency` (count, p50, p95, p99).
        With the default inner transport, `fast_paths` says which fast paths over
        httpx's and aiohttp's internals are in use (`policies.aiohttp_transport`).
        """
        snap = self._runtime.snapshot()
        fast_paths = getattr(self._env.inner, "fast_paths", None)
        if fast_paths is not None:
            snap["fast_paths"] = fast_paths()
        return snap

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Look up the `resolve` lines, then start their re-resolution and the active
        health checks (otherwise started by the first request, which waits for it), and
        the shared store's heartbeat."""
        if not self._started and not self._closed:
            if self._starting is None:
                self._starting = asyncio.ensure_future(self._start())
            await asyncio.shield(self._starting)
        if self._env.stores is not None:
            self._env.stores.start()

    async def _start(self) -> None:
        runtime = None
        while runtime is not self._runtime:  # a reload during the lookups: prepare it too
            runtime = self._runtime
            await self._prepare_lines(runtime)
        if self._closed:
            return
        self._discovery.run([ln for _, ln in runtime.resolved_lines()], runtime.plan.resolver)
        self._start_health(runtime)

    async def _prepare_lines(self, runtime: PlanRuntime) -> None:
        """Bind the runtime's lines to their shards; look up those never looked up."""
        pairs = runtime.resolved_lines()
        for shard in {id(s): s for s, _ in pairs}.values():
            shard.bind_lines()
        await self._discovery.prime([ln for _, ln in pairs], runtime.plan.resolver)

    def _dns_observed(self, line: ResolvedLine, lookup: Lookup) -> None:
        self._env.observer.dns_lookup(line.service, line.shard, line.spec.url, lookup.result,
                                      len(line.addresses))

    def store_status(self) -> tuple[bool | None, dict[str, int]]:
        """The shared store, for the metrics: up (None: the plan has none), errors by kind."""
        stores = self._env.stores
        if stores is None or self._runtime.store_binding.store is None:
            return None, stores.errors if stores is not None else {}
        return stores.status()

    async def aclose(self) -> None:
        """Stop discovery and the health checks, and close the inner transport."""
        self._closed = True
        self._started = True  # no lazy restart after close
        await self._discovery.stop()
        await self._stop_health(list(self._health.keys()))
        self._runtime.release()
        if self._env.stores is not None:
            await self._env.stores.aclose()
        await self._env.inner.aclose()

    def _start_health(self, runtime: PlanRuntime) -> None:
        self._started = True
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not in a loop yet: the first request starts them
            self._started = False
            return
        for shard in runtime.health_shards():
            task = loop.create_task(self._run_health(shard),
                                    name=f"riprap-health-{shard.service_name}-{shard.name or ''}")
            self._health[id(shard)] = (shard, task)

    async def _run_health(self, shard: ShardRuntime) -> None:
        while True:
            try:
                await shard.health_loop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep checking; a bug here must not stop health
                log.error("health checks of service %r stopped: %r; restarting",
                          shard.service_name, exc)
                await self._env.clock.sleep(1.0)

    async def _restart_health(self, old: PlanRuntime, new: PlanRuntime) -> None:
        await self._stop_health(list(self._health.keys()))
        self._start_health(new)

    async def _stop_health(self, keys: list[int]) -> None:
        tasks = []
        for key in keys:
            entry = self._health.pop(key, None)
            if entry is not None:
                entry[1].cancel()
                tasks.append(entry[1])
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)



def _breaker_state(service: ServiceRuntime) -> str | None:
    """The worst breaker state among the service's shards, for the call span."""
    states = {s.breaker.state for s in service.shards.values() if s.breaker is not None}
    for state in ("open", "half-open", "closed"):
        if state in states:
            return state
    return None


__all__ = ["SERVICE_EXTENSION", "ResilientTransport"]

