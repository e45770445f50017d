"""The fenced library internals (policies/httpx_compat.py, policies/aiohttp_compat.py):
every fast path is active with the httpx and aiohttp versions pyproject allows, it is
shown at /state and logged once, and a self-check that fails gives the slower public way
or a clear refusal, never a wrong answer."""

from __future__ import annotations

import asyncio
import logging
import tomllib
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement

from dsl.plan import EndpointSpec, Plan, ServicePlan
from policies import aiohttp_compat, aiohttp_transport, httpx_compat
from policies.aiohttp_transport import AiohttpTransport, active_fast_paths
from policies.transport import ResilientTransport
from wire_kit import WireConn, WireUpstream, keep_alive, ok, wait_for

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def bounds() -> dict[str, Requirement]:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return {r.name: r for r in reqs if r.name in ("httpx", "aiohttp")}


def test_httpx_and_aiohttp_are_bounded_above_and_below_and_the_installed_ones_fit() -> None:
    assert set(bounds()) == {"httpx", "aiohttp"}
    for name, req in bounds().items():
        ops = {spec.operator for spec in req.specifier}
        assert ops & {">=", ">"} and ops & {"<=", "<"}, f"{name} needs both bounds: {req}"
        assert req.specifier.contains(version(name)), f"{name} {version(name)} not in {req}"


def test_every_fast_path_is_active_with_the_versions_pyproject_allows() -> None:
    paths = active_fast_paths()
    assert set(paths) == {"httpx.header_items", "httpx.set_header", "httpx.build_request",
                          "httpx.make_url", "aiohttp.response_protocol",
                          "aiohttp.no_hidden_retries", "aiohttp.raw_header_bytes",
                          "aiohttp.head_limit_errors"}
    assert all(paths.values()), {k: v for k, v in paths.items() if not v}


async def test_the_fast_paths_are_shown_at_state_and_logged_once(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiohttp_transport, "_logged_fast_paths", False)
    caplog.set_level(logging.INFO, logger="riprap.upstream")
    async with WireUpstream() as up:
        plan = Plan(services={"api": ServicePlan(name="api", endpoints=(EndpointSpec(up.url),))})
        for _ in range(2):
            rt = ResilientTransport(plan)
            try:
                resp = await rt.handle_async_request(httpx.Request("GET", "http://api/"))
                await resp.aread()
                assert rt.snapshot()["fast_paths"] == active_fast_paths()
            finally:
                await rt.aclose()
    lines = [r.getMessage() for r in caplog.records if "library fast paths" in r.getMessage()]
    assert len(lines) == 1 and "aiohttp.no_hidden_retries on" in lines[0]


def test_a_fast_path_that_no_longer_matches_httpx_falls_back_to_the_public_way(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = httpx_compat._fast_request

    def changed(*args: object) -> httpx.Request:
        request = real(*args)  # type: ignore[arg-type]
        request.extensions = {}  # as if httpx moved where extensions live
        return request

    monkeypatch.setattr(httpx_compat, "_fast_request", changed)
    assert httpx_compat._choose_request() is httpx_compat._public_request
    monkeypatch.setattr(httpx.Headers, "_list", property(lambda self: []), raising=False)
    assert httpx_compat._choose_items() is httpx_compat._public_items


def test_a_protocol_that_no_longer_matches_aiohttp_fails_its_self_check(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiohttp_compat.RipRapProtocol, "data_received",
                        aiohttp_compat.ResponseHandler.data_received)
    loop = asyncio.new_event_loop()
    try:
        assert aiohttp_compat._check_protocol(loop) is False
    finally:
        loop.close()


async def test_without_the_protocol_connections_are_not_reused_so_a_stray_answer_is_never_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(aiohttp_compat.FAST_PATHS, "aiohttp.response_protocol", False)

    async def run(conn: WireConn) -> None:
        if len(conn.upstream.conns) == 1:
            await conn.request()
            await conn.answer(ok(b"first") + ok(b"STRAY"))
            await conn.wait_closed_by_peer()
            return
        await keep_alive(ok(b"second"))(conn)

    async with WireUpstream(run) as up:
        t = AiohttpTransport()
        try:
            for path, want in (("/", "first"), ("/next", "second")):
                r = await t.handle_async_request(httpx.Request("GET", f"{up.url}{path}"))
                assert (await r.aread()).decode() == want
        finally:
            await t.aclose()
        assert await wait_for(lambda: len(up.conns) == 2)
