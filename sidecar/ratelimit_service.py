"""Envoy's global rate limit API, served by riprap on loopback, backed by the shared store.

On the Envoy engine a `limit ... shared` is enforced by Envoy's `envoy.filters.http.ratelimit`
filter, which asks this service (`envoy.service.ratelimit.v3.RateLimitService/
ShouldRateLimit`, gRPC: `grpcio`'s generic handlers over the messages of
`sidecar.rls_messages`, built with protobuf, not xds-protos, whose files break OpenTelemetry)
about every call. It answers from the SAME store and the SAME bucket script as the Python engine
(`policies.shared_limit`), so a fleet may mix engines: a Python sidecar and an Envoy one of
the same app draw on one bucket.

The descriptor convention (the Envoy configuration emits exactly this):

- `domain` is the plan's `app`;
- each descriptor has the entry `("riprap_service", SERVICE)` and, for `limit ... per header
  H shared`, also `("riprap_key", <the value of H>)` (a request without the header sends
  no `riprap_key` and shares the no-header bucket, as on the Python engine).

A descriptor for a service whose limit is not shared (or not in the plan, or another
domain) is answered OK: this service only enforces shared limits. Over the limit, the
descriptor's status is OVER_LIMIT with `duration_until_reset` = the time until the next
token, and the response carries `retry-after` (whole seconds, rounded up) and
`x-riprap-reason: rate-limited` in `response_headers_to_add`, which Envoy adds to its 429.
While the store is down, each answer comes from the local fallback share, as on the
Python engine.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from dsl.plan import Plan, ServicePlan
from policies.clock import Clock, SystemClock
from policies.limiter import retry_after_seconds
from policies.shared_limit import SharedLimiter
from policies.store import Store, StoreHub
from sidecar import rls_messages as rls

# riprap forks only to exec (Envoy, `envoy --mode validate`, the app), so gRPC's fork
# handlers have nothing to do, and its core logs "skipping fork() handlers" on every fork
# while its threads run (on every reload). Off for this process: set before grpc reads it
# (at import and at the first server), then put back (`_restore_fork_env`) so the processes
# riprap starts get the environment they were given.
_FORK_ENV = "GRPC_ENABLE_FORK_SUPPORT"
_fork_env_was = os.environ.get(_FORK_ENV)
os.environ.setdefault(_FORK_ENV, "false")

import grpc  # noqa: E402 - after the variable above

log = logging.getLogger("riprap.ratelimit")

SERVICE_ENTRY = "riprap_service"
KEY_ENTRY = "riprap_key"
_MAX_KEY = 8192  # longer descriptor values are refused as bad input (Envoy caps headers too)


def shared_limited_services(plan: Plan) -> dict[str, ServicePlan]:
    """The services of `plan` whose (service-level) limit is `shared`."""
    return {name: svc for name, svc in plan.services.items()
            if svc.limit is not None and svc.limit.shared}


class _Limits:
    """The shared limiters of one plan, holding its store (released on replacement)."""

    def __init__(self, plan: Plan, hub: StoreHub, clock: Clock,
                 previous: "_Limits | None") -> None:
        self.plan = plan
        self.app = plan.app
        self.hub = hub
        self.store: Store | None = None
        self.limiters: dict[str, SharedLimiter] = {}
        services = shared_limited_services(plan)
        if not services:
            return
        if plan.store is None:
            raise ValueError("the plan has shared limits but no `store`")
        self.store = hub.acquire(plan.store, tuple(
            SharedLimiter.presence_key_for(plan.app, name) for name in services))
        prev = previous.limiters if previous is not None and previous.store is self.store else {}
        for name, svc in services.items():
            assert svc.limit is not None
            old = prev.get(name)
            if old is not None and old.spec == svc.limit and previous is not None and (
                    previous.app == plan.app):
                self.limiters[name] = old
            else:
                self.limiters[name] = SharedLimiter(svc.limit, name, None, clock,
                                                    self.store, plan.app)

    def release(self) -> None:
        if self.store is not None:
            self.hub.release(self.store, tuple(
                lim.presence_key for lim in self.limiters.values()))
            self.store = None


class RateLimitServicer:
    """ShouldRateLimit over the current plan's shared limiters."""

    def __init__(self, plan_source: Callable[[], Plan], hub: StoreHub,
                 clock: Clock | None = None) -> None:
        self._source = plan_source
        self._hub = hub
        self._clock = clock or SystemClock()
        self._limits: _Limits | None = None
        self.calls = 0
        self.over_limit = 0

    def limits(self) -> _Limits:
        """The limiters of the current plan (rebuilt, carrying state, when it changed)."""
        plan = self._source()
        limits = self._limits
        if limits is None or limits.plan is not plan:
            new = _Limits(plan, self._hub, self._clock, limits)
            self._limits = new
            if limits is not None:
                limits.release()
            limits = new
        return limits

    def close(self) -> None:
        if self._limits is not None:
            self._limits.release()
            self._limits = None

    async def ShouldRateLimit(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's name
        self.calls += 1
        try:
            limits = self.limits()
        except ValueError as exc:
            log.error("rate limit service: %s", exc)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        response = rls.RateLimitResponse(overall_code=rls.OK)
        if request.domain != limits.app:
            for _ in request.descriptors:
                response.statuses.add(code=rls.OK)
            return response
        cost = max(1, int(request.hits_addend or 1))
        longest = 0.0
        for descriptor in request.descriptors:
            service: str | None = None
            key: str | None = None
            for entry in descriptor.entries:
                if entry.key == SERVICE_ENTRY:
                    service = entry.value
                elif entry.key == KEY_ENTRY:
                    key = entry.value
            status = response.statuses.add(code=rls.OK)
            limiter = limits.limiters.get(service) if service is not None else None
            if limiter is None:
                continue
            if key is not None and len(key) > _MAX_KEY:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{KEY_ENTRY} longer than {_MAX_KEY} characters")
            wait = await limiter.take(key if limiter.per_header else None, cost)
            if wait:
                status.code = rls.OVER_LIMIT
                rls.set_duration(status.duration_until_reset, wait)
                longest = max(longest, wait)
        if longest:
            self.over_limit += 1
            response.overall_code = rls.OVER_LIMIT
            response.response_headers_to_add.add(key="retry-after",
                                                 value=str(retry_after_seconds(longest)))
            response.response_headers_to_add.add(key="x-riprap-reason", value="rate-limited")
        return response


def handler(servicer: RateLimitServicer) -> Any:
    """The gRPC generic handler that routes Envoy's ShouldRateLimit to `servicer`."""
    method = grpc.unary_unary_rpc_method_handler(
        servicer.ShouldRateLimit,
        request_deserializer=rls.RateLimitRequest.FromString,
        response_serializer=rls.RateLimitResponse.SerializeToString)
    return grpc.method_handlers_generic_handler(rls.SERVICE_NAME, {rls.METHOD_NAME: method})


def _restore_fork_env() -> None:
    if _fork_env_was is None:
        os.environ.pop(_FORK_ENV, None)
    else:
        os.environ[_FORK_ENV] = _fork_env_was


class RateLimitService:
    """The gRPC server: `await start()` (returns the bound port), `await stop()`.

    `plan_source()` returns the plan in force (asked on every call, so a hot reload is
    picked up by the next call); `hub` holds the store connections; `port` 0 binds a free
    one. The server binds only to 127.0.0.1.
    """

    def __init__(self, plan_source: Callable[[], Plan], hub: StoreHub, port: int = 0, *,
                 host: str = "127.0.0.1", clock: Clock | None = None) -> None:
        self.servicer = RateLimitServicer(plan_source, hub, clock)
        self.hub = hub
        self.host = host
        self.port = port
        self._server: Any = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> int:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler(self.servicer),))
        bound = server.add_insecure_port(f"{self.host}:{self.port}")
        if not bound:
            raise OSError(f"rate limit service: cannot bind {self.host}:{self.port}")
        await server.start()
        _restore_fork_env()
        self._server = server
        self.port = int(bound)
        self.servicer.limits()  # connect to the store now, not on the first call
        self.hub.start()
        log.info("rate limit service on %s", self.address)
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
        self.servicer.close()

    def snapshot(self) -> dict[str, Any]:
        limits = self.servicer._limits
        return {
            "address": self.address,
            "calls": self.servicer.calls,
            "over_limit": self.servicer.over_limit,
            "limits": {name: lim.snapshot() for name, lim in limits.limiters.items()}
            if limits is not None else {},
            "store": self.hub.snapshot(),  # its URL without the password
        }


__all__ = ["KEY_ENTRY", "SERVICE_ENTRY", "RateLimitService", "RateLimitServicer", "handler",
           "shared_limited_services"]
