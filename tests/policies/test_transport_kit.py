"""Test kit for ResilientTransport: in-memory upstreams, plan builders, a recording observer.

Imported by the other `test_transport*.py` modules; holds no tests of its own beyond a
check that the kit's upstream records what it is sent.
"""

from __future__ import annotations

import asyncio
import inspect
import random
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx

from dsl.plan import EndpointSpec, Plan, ServicePlan
from policies.transport import ResilientTransport

Behaviour = Callable[[httpx.Request], "httpx.Response | Awaitable[httpx.Response]"]


@dataclass
class Seen:
    port: int
    method: str
    url: str
    headers: httpx.Headers
    body: bytes


class Upstream:
    """In-memory replicas keyed by port (endpoints http://127.0.0.1:PORT); every request is recorded."""

    def __init__(self) -> None:
        self.behaviours: dict[int, Behaviour] = {}
        self.seen: list[Seen] = []
        self.cancelled: list[int] = []  # ports whose handler was cancelled mid-call

    def on(self, port: int, behaviour: Behaviour) -> None:
        self.behaviours[port] = behaviour

    async def handler(self, request: httpx.Request) -> httpx.Response:
        port = request.url.port or 80
        body = await request.aread()
        self.seen.append(Seen(port, request.method, str(request.url), request.headers, body))
        behaviour = self.behaviours.get(port)
        if behaviour is None:
            return httpx.Response(200, text=f"ok from {port}")
        try:
            result = behaviour(request)
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError:
            self.cancelled.append(port)
            raise
        return result

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)

    def ports(self) -> list[int]:
        return [s.port for s in self.seen]


class TrackedStream(httpx.AsyncByteStream):
    """A response body that yields its chunks when told to, and records being closed."""

    def __init__(self, chunks: list[bytes], gate: asyncio.Event | None = None) -> None:
        self.chunks = chunks
        self.gate = gate
        self.yielded = 0
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i, chunk in enumerate(self.chunks):
            if i > 0 and self.gate is not None:
                await self.gate.wait()
            self.yielded += 1
            yield chunk

    async def aclose(self) -> None:
        self.closed = True


async def hang(_request: httpx.Request) -> httpx.Response:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def status(code: int, text: str = "", headers: dict[str, str] | None = None) -> Behaviour:
    return lambda _r: httpx.Response(code, text=text or f"status {code}", headers=headers)


def raises(exc_type: type[httpx.HTTPError]) -> Behaviour:
    def behave(request: httpx.Request) -> httpx.Response:
        raise exc_type("boom", request=request)
    return behave


def sequence(*behaviours: Behaviour) -> Behaviour:
    """Each call uses the next behaviour; the last one repeats."""
    queue = list(behaviours)

    def behave(request: httpx.Request) -> Any:
        b = queue.pop(0) if len(queue) > 1 else queue[0]
        return b(request)
    return behave


def ep(port: int, **kw: Any) -> EndpointSpec:
    return EndpointSpec(f"http://127.0.0.1:{port}", **kw)


def service(name: str = "api", ports: tuple[int, ...] = (9001,), **kw: Any) -> ServicePlan:
    kw.setdefault("balance", "round-robin")
    if "endpoints" not in kw and "shards" not in kw:
        kw["endpoints"] = tuple(ep(p) for p in ports)
    return ServicePlan(name=name, **kw)


def plan(*services: ServicePlan) -> Plan:
    return Plan(app="test", services={s.name: s for s in services})


@dataclass
class Recorder:
    """An Observer that keeps every event, in order."""

    events: list[tuple[Any, ...]] = field(default_factory=list)

    def call_finished(self, service: str, outcome: str, status: int, attempts: int,
                      duration: float, fallback: str | None) -> None:
        self.events.append(("call", service, outcome, status, attempts, fallback))

    def attempt_finished(self, service: str, endpoint: str, outcome: str, latency: float) -> None:
        self.events.append(("attempt", service, endpoint, outcome))

    def retried(self, service: str) -> None:
        self.events.append(("retried", service))

    def retry_refused(self, service: str, why: str) -> None:
        self.events.append(("retry_refused", service, why))

    def hedged(self, service: str) -> None:
        self.events.append(("hedged", service))

    def breaker_changed(self, service: str, shard: str | None, state: str) -> None:
        self.events.append(("breaker", service, shard, state))

    def ejected(self, service: str, endpoint: str) -> None:
        self.events.append(("ejected", service, endpoint))

    def rejected(self, service: str, by: str) -> None:
        self.events.append(("rejected", service, by))

    def health_changed(self, service: str, endpoint: str, healthy: bool) -> None:
        self.events.append(("health", service, endpoint, healthy))

    def kinds(self, kind: str) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == kind]


def make(p: Plan, upstream: Upstream, clock: Any, **kw: Any) -> tuple[ResilientTransport, httpx.AsyncClient]:
    kw.setdefault("rng", random.Random(7))
    rt = ResilientTransport(p, upstream.transport(), clock=clock, **kw)
    return rt, httpx.AsyncClient(transport=rt, base_url="http://api")


async def test_the_kit_records_port_method_and_body() -> None:
    up = Upstream()
    up.on(9002, status(418))
    async with httpx.AsyncClient(transport=up.transport()) as c:
        r = await c.post("http://127.0.0.1:9002/x", content=b"hi")
    assert r.status_code == 418
    assert [(s.port, s.method, s.body) for s in up.seen] == [(9002, "POST", b"hi")]
