"""A call that runs out of time only because its caller's `x-riprap-deadline-ms` was
shorter than the service's timeout is not the upstream's failure (section 9 "Deadlines";
issue 10 item 8): it opens no breaker, and a probe cut that way does not reopen one for
twice as long. Real sockets: a healthy upstream answering in 30 ms."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from dsl.plan import BreakerSpec, EndpointSpec, OutlierSpec, Plan, ServicePlan
from policies.aiohttp_transport import AiohttpTransport
from policies.transport import ResilientTransport
from wire_kit import WireConn, WireUpstream, ok, wait_for


def slow_upstream(state: dict[str, Any]) -> Any:
    async def run(conn: WireConn) -> None:
        while await conn.request() is not None:
            await asyncio.sleep(0.03)
            if state.get("fail"):
                await conn.answer(b"HTTP/1.1 500 No\r\ncontent-length: 0\r\n\r\n")
            else:
                await conn.answer(ok())
    return run


async def call(rt: ResilientTransport, deadline_ms: str | None = None) -> httpx.Response:
    headers = {"x-riprap-deadline-ms": deadline_ms} if deadline_ms else {}
    resp = await rt.handle_async_request(httpx.Request("GET", "http://api/", headers=headers))
    await resp.aread()
    return resp


def engine(url: str, open_s: float = 30.0) -> ResilientTransport:
    spec = ServicePlan(name="api", endpoints=(EndpointSpec(url),), timeout=5.0,
                       breaker=BreakerSpec(kind="consecutive", failures=3, open=open_s),
                       outlier=OutlierSpec(failures=3))
    return ResilientTransport(Plan(services={"api": spec}), AiohttpTransport())


def shard_state(rt: ResilientTransport) -> dict[str, Any]:
    return rt.snapshot()["services"]["api"]  # type: ignore[no-any-return]


async def test_short_caller_deadlines_do_not_open_a_healthy_upstreams_breaker() -> None:
    async with WireUpstream(slow_upstream({})) as up:
        rt = engine(up.url)
        try:
            shorts = [await call(rt, "5") for _ in range(3)]
            state = shard_state(rt)
            normal = await call(rt)
        finally:
            await rt.aclose()
    assert [r.status_code for r in shorts] == [504, 504, 504]
    assert all(r.headers["x-riprap-reason"] == "timeout" for r in shorts)
    assert state["breaker"]["state"] == "closed" and state["breaker"]["failures"] == 0
    assert state["endpoints"][0]["ejected"] is False
    assert state["endpoints"][0]["consecutive_failures"] == 0
    assert state["latency"]["count"] == 0  # no latency sample from a cut call
    assert normal.status_code == 200


async def test_a_probe_cut_by_the_callers_deadline_does_not_reopen_the_breaker_for_longer(
        ) -> None:
    state: dict[str, Any] = {"fail": True}
    async with WireUpstream(slow_upstream(state)) as up:
        rt = engine(up.url, open_s=0.3)
        try:
            for _ in range(3):
                assert (await call(rt)).status_code == 500
            assert shard_state(rt)["breaker"]["state"] == "open"
            state["fail"] = False
            assert await wait_for(lambda: shard_state(rt)["breaker"]["state"] == "half-open")
            probe = await call(rt, "5")  # the probe slot, cut by the caller's 5 ms
            after_probe = shard_state(rt)["breaker"]
            good = await call(rt)
            closed = shard_state(rt)["breaker"]
        finally:
            await rt.aclose()
    assert probe.status_code == 504
    assert after_probe["state"] == "half-open" and after_probe["open_for"] == 0.3
    assert good.status_code == 200 and closed["state"] == "closed"


async def test_the_services_own_timeout_still_counts() -> None:
    async with WireUpstream(slow_upstream({})) as up:
        spec = ServicePlan(name="api", endpoints=(EndpointSpec(up.url),), timeout=0.005,
                           breaker=BreakerSpec(kind="consecutive", failures=3))
        rt = ResilientTransport(Plan(services={"api": spec}), AiohttpTransport())
        try:
            # a caller deadline longer than the service's timeout: the service's own cut
            results = [await call(rt, "5000") for _ in range(3)]
            after = await call(rt)
        finally:
            await rt.aclose()
    assert [r.status_code for r in results] == [504, 504, 504]
    assert after.headers["x-riprap-reason"] == "breaker-open"
