"""The stage interface on its own: chains built from a hand-made `StageParts`, with no
`PlanRuntime` — and the extension points the interface promises (an awaited limiter,
an endpoint list replaced under calls in flight, per-endpoint request
extensions, whose deadline was in force)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx
import pytest

from dsl.plan import DEFAULT_ORDER, EndpointSpec, RetrySpec, ServicePlan
from policies.clock import FakeClock
from policies.context import CallContext
from policies.endpoint import EndpointPool, EndpointRuntime
from policies.env import Env
from policies.errors import RateLimited
from policies.health import EndpointState
from policies.latency import LatencyWindow
from policies.pipeline import BUILDERS, build_chain
from policies.balancer import make_balancer
from policies.retry import RetryPolicy
from policies.safe_observer import SafeObserver
from policies.stage import AsyncLimiter, StageParts
from riprap_testing.clock import VirtualClock

Handler = Any


def endpoints(*ports: int) -> list[EndpointRuntime]:
    specs = [EndpointSpec(f"http://127.0.0.1:{p}") for p in ports]
    return [EndpointRuntime(s, EndpointState.from_spec(s)) for s in specs]


def make_parts(handler: Handler, order: tuple[str, ...], *, clock: Any = None,
               ports: tuple[int, ...] = (9001,), **kw: Any) -> StageParts:
    spec = kw.pop("spec", None) or ServicePlan("api", order=order, timeout=2.0)
    env = Env(clock or FakeClock(), random.Random(1), SafeObserver(None),
              httpx.MockTransport(handler), chaos=False)
    return StageParts(service="api", shard=None, spec=spec, order=order, env=env,
                      pool=EndpointPool(endpoints(*ports)),
                      balancer=make_balancer("round-robin", env.rng), latency=LatencyWindow(),
                      **kw)


class NoServices:
    def has_service(self, name: str) -> bool:
        return False

    async def call_service(self, name: str, request: httpx.Request,
                           incoming_deadline: float | None,
                           depth: int) -> tuple[httpx.Response, int] | None:
        return None


def context(parts: StageParts, request: httpx.Request | None = None,
            incoming_deadline: float | None = None) -> CallContext:
    return CallContext(NoServices(), request or httpx.Request("GET", "http://api/x"),
                       wanted=frozenset(), body_bound=1 << 20,
                       needs_replay=parts.needs_replay, incoming_deadline=incoming_deadline,
                       start=parts.env.clock.now())


def test_every_stage_the_plan_can_name_has_a_builder() -> None:
    assert tuple(BUILDERS) == DEFAULT_ORDER


async def test_a_chain_runs_from_its_parts_alone() -> None:
    answers = iter([503, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(answers))

    parts = make_parts(handler, ("retry", "balance"),
                       retry=RetryPolicy(RetrySpec(2, on=("5xx",))))
    chain = build_chain(parts)
    assert chain.names == ("retry", "balance")
    ctx = context(parts)
    resp = await chain.handler(ctx)
    assert resp.status_code == 200 and ctx.attempts == 2


async def test_an_async_limiter_is_awaited() -> None:
    class SharedLimiter:
        per_header = None

        def __init__(self) -> None:
            self.waits = [0.0, 2.5]
            self.asked: list[str | None] = []

        async def take(self, key: str | None = None) -> float:
            await asyncio.sleep(0)  # as a store round trip would
            self.asked.append(key)
            return self.waits.pop(0)

    limiter = SharedLimiter()
    assert isinstance(limiter, AsyncLimiter)
    parts = make_parts(lambda r: httpx.Response(200), ("limit", "balance"), limiter=limiter)
    chain = build_chain(parts)
    assert chain.names == ("limit", "balance")
    assert (await chain.handler(context(parts))).status_code == 200
    with pytest.raises(RateLimited) as refused:
        await chain.handler(context(parts))
    assert refused.value.retry_after == 2.5 and limiter.asked == [None, None]


async def test_an_endpoint_list_replaced_under_a_call_in_flight() -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.port == 9001:
            entered.set()
            await release.wait()
        return httpx.Response(200, text=str(request.url.port))

    parts = make_parts(handler, ("balance",))
    chain = build_chain(parts)
    old = parts.pool.endpoints[0]
    first = asyncio.ensure_future(chain.handler(context(parts)))
    await entered.wait()
    parts.pool.replace(endpoints(9002))  # a re-lookup answered while the call waits
    second = await chain.handler(context(parts))
    assert second.text == "9002"
    release.set()
    resp = await first
    assert resp.text == "9001"  # the call in flight finished on the endpoint it picked
    await resp.aclose()
    assert old.state.in_flight == 0  # and its slot was given back to the old endpoint
    assert [e.state.url for e in parts.pool.endpoints] == ["http://127.0.0.1:9002"]


async def test_every_attempt_carries_its_endpoints_request_extensions() -> None:
    marker = object()
    got: list[object] = []

    def handler(request: httpx.Request) -> httpx.Response:
        got.append(request.extensions.get("riprap.tls"))
        return httpx.Response(200)

    parts = make_parts(handler, ("balance",))
    parts.pool.endpoints[0].extensions["riprap.tls"] = marker  # how TLS reaches the inner transport
    await build_chain(parts).handler(context(parts))
    assert got == [marker]


async def test_the_context_says_whose_deadline_is_in_force(vclock: VirtualClock) -> None:
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers["x-riprap-deadline-ms"])
        return httpx.Response(200)

    parts = make_parts(handler, ("timeout", "balance"), clock=vclock)
    chain = build_chain(parts)
    callers = context(parts, incoming_deadline=vclock.now() + 0.5)  # shorter than 2s
    await chain.handler(callers)
    own = context(parts, incoming_deadline=vclock.now() + 5.0)
    await chain.handler(own)
    assert callers.caller_bound is True and own.caller_bound is False
    assert sent == ["500", "2000"]
