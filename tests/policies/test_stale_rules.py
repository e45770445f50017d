"""`fallback stale` keeps only what a shared cache could store (RFC 9111; section 9 "Stale
answers"), keyed by the request headers `Vary` names: one user's private answer is never
replayed to another (issue 10 item 7). Real sockets: the engine over aiohttp against a
raw upstream that first answers, then fails."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from dsl.plan import EndpointSpec, FallbackSpec, Plan, ServicePlan
from policies.aiohttp_transport import AiohttpTransport
from policies.transport import ResilientTransport
from wire_kit import WireConn, WireUpstream, ok


def upstream(state: dict[str, Any]) -> Any:
    """Answers `state["answer"]` while `state["up"]`, else a 503."""
    async def run(conn: WireConn) -> None:
        while await conn.request() is not None:
            if state["up"]:
                await conn.answer(state["answer"])
            else:
                await conn.answer(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n"
                                  b"\r\ndown")
    return run


def engine(url: str) -> ResilientTransport:
    spec = ServicePlan(name="api", endpoints=(EndpointSpec(url),), timeout=5.0,
                       fallbacks=(FallbackSpec("stale", max_age=60.0),))
    return ResilientTransport(Plan(services={"api": spec}), AiohttpTransport())


async def get(rt: ResilientTransport, headers: Any = None, path: str = "/me") -> httpx.Response:
    resp = await rt.handle_async_request(httpx.Request("GET", f"http://api{path}",
                                                       headers=headers))
    await resp.aread()
    return resp


ALICE = {"authorization": "Bearer alice-token"}


@pytest.mark.parametrize("first,extra,second,replayed", [
    ({}, b"", {}, True),                                                     # a plain answer
    (ALICE, b"", {}, False),                                                 # Authorization
    (ALICE, b"cache-control: public, max-age=60\r\n", {}, True),             # ... unless public
    ({"cookie": "sid=alice"}, b"", {}, False),                               # Cookie
    ({}, b"set-cookie: sid=alice; HttpOnly\r\n", {}, False),                 # Set-Cookie
    ({}, b"cache-control: max-age=60, private\r\n", {}, False),              # private
    ({}, b'cache-control: private="x-user"\r\n', {}, False),
    ({}, b"cache-control: no-store\r\n", {}, False),                         # no-store
    ({}, b"vary: *\r\n", {}, False),                                         # Vary: *
    ({"x-user": "alice"}, b"vary: X-User\r\n", {"x-user": "bob"}, False),    # another variant
    ({"x-user": "alice"}, b"vary: X-User\r\n", {"x-user": "alice"}, True),   # the same one
    ({"x-user": "alice"}, b"vary: Accept, X-User\r\n", {}, False),           # header absent
], ids=["plain", "authorization", "authorization-public", "cookie", "set-cookie", "private",
        "private-field", "no-store", "vary-star", "vary-other", "vary-same", "vary-absent"])
async def test_what_a_shared_cache_could_store_is_all_that_is_replayed(
        first: dict[str, str], extra: bytes, second: dict[str, str], replayed: bool) -> None:
    state = {"up": True, "answer": ok(b"the answer", extra)}
    async with WireUpstream(upstream(state)) as up:
        rt = engine(up.url)
        try:
            assert (await get(rt, first)).status_code == 200
            state["up"] = False
            r = await get(rt, second)
        finally:
            await rt.aclose()
    if replayed:
        assert (r.status_code, r.text, r.headers["x-riprap-fallback"]) == (200, "the answer",
                                                                           "stale")
    else:
        assert (r.status_code, r.text) == (503, "down") and "x-riprap-fallback" not in r.headers
    assert len(up.heads) == 2


async def test_one_users_private_answer_is_never_replayed_to_another_who_forces_the_fallback(
        ) -> None:
    state = {"up": True}

    async def run(conn: WireConn) -> None:  # a per-user answer, 20 ms late
        while (head := await conn.request()) is not None:
            await asyncio.sleep(0.02)
            if not state["up"]:
                await conn.answer(b"HTTP/1.1 503 No\r\ncontent-length: 4\r\n\r\ndown")
                continue
            user = b"alice" if b"alice-token" in head else b"someone"
            await conn.answer(ok(b'{"user": "%s", "token": "%s-secret"}' % (user, user),
                                 b"set-cookie: session=%s\r\n" % user))

    async with WireUpstream(run) as up:
        rt = engine(up.url)
        try:
            a = await get(rt, ALICE)
            # bob asks for the fallback himself: a 1 ms deadline, the upstream healthy
            b = await get(rt, {"x-riprap-deadline-ms": "1"})
            state["up"] = False
            c = await get(rt, {"authorization": "Bearer bob-token"})
            snap = rt.snapshot()["services"]["api"]["stale_cache"]
        finally:
            await rt.aclose()
    assert a.status_code == 200 and b"alice-secret" in a.content
    assert b.status_code == 504 and b.headers["x-riprap-reason"] == "timeout"
    assert c.status_code == 503 and c.text == "down"
    for r in (b, c):
        assert b"alice" not in r.content and "set-cookie" not in r.headers
        assert "x-riprap-fallback" not in r.headers
    assert snap["entries"] == 0
