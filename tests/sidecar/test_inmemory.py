"""The sidecar's ASGI apps in memory: `httpx.ASGITransport` in front, `httpx.MockTransport`
behind. Fast checks of the adapter itself and of the plan holder's reload logic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from dsl.plan import BackoffSpec, EndpointSpec, Plan, RetrySpec, ServicePlan
from riprap_testing.clock import VirtualClock
from sidecar.app import Sidecar, create_app
from sidecar.reload import PlanLoadError, fingerprint

seen: list[httpx.Request] = []


async def upstream(request: httpx.Request) -> httpx.Response:
    body = await request.aread()
    seen.append(request)
    return httpx.Response(200, json={"url": str(request.url), "body": len(body)},
                          headers={"x-up": "1", "connection": "x-up2", "x-up2": "gone"})


def plan() -> Plan:
    return Plan(services={"payments": ServicePlan(
        "payments", hosts=("pay.internal",),
        endpoints=(EndpointSpec("http://127.0.0.1:9001/base"),))})


@pytest.fixture()
async def sidecar() -> Any:
    sc = create_app(plan(), inner=httpx.MockTransport(upstream))
    yield sc
    await sc.aclose()


def client(app: Any, base: str = "http://pay.internal") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base)


async def test_a_routed_call_reaches_the_endpoint_with_its_path_and_query(sidecar: Sidecar) -> None:
    async with client(sidecar.proxy) as c:
        r = await c.post("/charges/1?x=y", content=b"abc")
    assert r.status_code == 200
    assert r.json() == {"url": "http://127.0.0.1:9001/base/charges/1?x=y", "body": 3}
    assert r.headers["x-riprap-attempts"] == "1"
    assert r.headers["x-up"] == "1" and "x-up2" not in r.headers
    assert seen[-1].headers["host"] == "127.0.0.1:9001"


async def test_path_prefix_routing_in_memory(sidecar: Sidecar) -> None:
    async with client(sidecar.proxy, "http://127.0.0.1:7400") as c:
        r = await c.get("/payments/c")
    assert r.json()["url"] == "http://127.0.0.1:9001/base/c"


async def test_unknown_service_is_refused_in_memory(sidecar: Sidecar) -> None:
    async with client(sidecar.proxy, "http://127.0.0.1:7400") as c:
        r = await c.get("/nobody/c")
    assert r.status_code == 404 and r.json()["services"] == ["payments"]


async def test_admin_readiness_follows_draining(sidecar: Sidecar) -> None:
    async with client(sidecar.admin, "http://admin") as c:
        assert (await c.get("/readyz")).status_code == 200
        sidecar.holder.draining = True
        assert (await c.get("/readyz")).status_code == 503
        assert (await c.get("/healthz")).status_code == 200
        doc = (await c.get("/plan")).json()
    assert doc["hash"] == plan().digest() and doc["last_error"] is None
    assert doc["plan"]["services"]["payments"]["hosts"] == ["pay.internal"]


POLICY = "service payments {\n    endpoint http://127.0.0.1:9001\n}\n"


async def test_holder_reload_swaps_plan_and_router_and_keeps_it_on_errors(tmp_path: Path) -> None:
    path = tmp_path / "p.riprap"
    path.write_text(POLICY)
    sc = create_app(path, inner=httpx.MockTransport(upstream), watch=False)
    try:
        first = sc.holder.digest
        path.write_text(POLICY + "\nservice ledger {\n    endpoint http://127.0.0.1:9002\n}\n")
        assert await sc.holder.reload("test") is True
        assert sc.holder.digest != first and "ledger" in sc.holder.router.services
        assert sc.transport.plan is sc.holder.plan
        good = sc.holder.digest
        path.write_text("service payments {\n    endpoint nowhere\n}\n")
        assert await sc.holder.reload("test") is False
        assert sc.holder.digest == good and sc.holder.last_error
        assert sc.holder.last_error[0]["severity"] == "error"
        path.write_text(POLICY)
        assert await sc.holder.reload("test") is True
        assert sc.holder.last_error is None and sc.holder.digest == first
    finally:
        await sc.aclose()


def test_create_app_raises_located_diagnostics_for_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.riprap"
    path.write_text("service a {\n    retry lots\n}\n")
    with pytest.raises(PlanLoadError) as info:
        create_app(path, inner=httpx.MockTransport(upstream))
    assert any(d.is_error for d in info.value.diagnostics)
    assert str(path) in info.value.text


def test_fingerprint_follows_content_through_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "a"
    target.write_text("1")
    link = tmp_path / "link"
    link.symlink_to(target)
    before = fingerprint((str(link),))
    target.write_text("2")
    assert fingerprint((str(link),)) != before
    assert fingerprint((str(tmp_path / "missing"),)) == fingerprint((str(tmp_path / "missing"),))


async def test_an_engine_failure_is_answered_502_not_500() -> None:
    sc = create_app(plan(), inner=httpx.MockTransport(upstream))

    async def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("engine bug")

    sc.holder._transport.handle_async_request = broken  # type: ignore[method-assign]
    try:
        async with client(sc.proxy) as c:
            r = await c.get("/x")
        assert r.status_code == 502 and r.headers["x-riprap-reason"] == "upstream-failed"
        assert r.headers["x-riprap-attempts"] == "0"
    finally:
        await sc.aclose()


async def test_a_204_with_a_content_length_keeps_the_connection_usable() -> None:
    async def odd(request: httpx.Request) -> httpx.Response:
        return httpx.Response(204, headers={"content-length": "12"})

    sc = create_app(plan(), inner=httpx.MockTransport(odd))
    try:
        async with client(sc.proxy) as c:
            r = await c.get("/x")
        assert r.status_code == 204 and "content-length" not in r.headers
    finally:
        await sc.aclose()


async def test_the_sidecar_runs_in_virtual_time(vclock: VirtualClock) -> None:
    """`create_app(clock=...)`: deadlines and backoffs of the whole sidecar on a virtual
    clock — exact timings, no real waiting."""
    calls: list[float] = []

    async def slow_then_hang(request: httpx.Request) -> httpx.Response:
        calls.append(vclock.now())
        if len(calls) == 1:
            return httpx.Response(503)
        await vclock.sleep(60)  # never answers within the deadline
        return httpx.Response(200)

    p = Plan(services={"payments": ServicePlan(
        "payments", hosts=("pay.internal",), endpoints=(EndpointSpec("http://127.0.0.1:9001"),),
        timeout=2.0, retry=RetrySpec(1, on=("5xx",), backoff=BackoffSpec("constant", 0.5, 0.5, jitter="none")))})
    sc = create_app(p, inner=httpx.MockTransport(slow_then_hang), clock=vclock, watch=False,
                    supervise=False)
    try:
        t0 = vclock.now()
        async with client(sc.proxy) as c:
            r = await c.get("/x")
        assert r.status_code == 504 and r.headers["x-riprap-reason"] == "timeout"
        assert [t - t0 for t in calls] == [0.0, 0.5]  # the retry after its 500ms backoff
        assert vclock.now() - t0 == pytest.approx(2.0)  # cut by the 2s deadline, exactly
    finally:
        await sc.aclose()
