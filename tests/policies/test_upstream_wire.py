"""What reaches an upstream, byte for byte, and what is taken from it: the engine over the
default inner transport (aiohttp) against a raw-socket upstream on 127.0.0.1 that records
every byte and misbehaves on the wire (issue 10 items 1, 2, 5 and 11; section 9)."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import httpx
import pytest
import pytest_asyncio

from dsl.plan import BreakerSpec, EndpointSpec, OutlierSpec, Plan, RetrySpec, ServicePlan
from policies import aiohttp_compat
from policies.aiohttp_transport import AiohttpTransport
from policies.transport import ResilientTransport
from wire_kit import WireConn, WireUpstream, keep_alive, ok, wait_for


def engine(url: str, **service: Any) -> ResilientTransport:
    spec = ServicePlan(name="api", endpoints=(EndpointSpec(url),), timeout=5.0, **service)
    return ResilientTransport(Plan(services={"api": spec}), AiohttpTransport(connect_timeout=2.0))


async def get(rt: ResilientTransport, path: str = "/", headers: Any = None) -> httpx.Response:
    resp = await rt.handle_async_request(httpx.Request("GET", f"http://api{path}",
                                                       headers=headers))
    await resp.aread()
    return resp


@pytest_asyncio.fixture(params=["switch", "guard"])
async def resend_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
                      ) -> AsyncIterator[str]:
    """Both ways of stopping aiohttp's own resends: its private switch (the fast path) and
    the public trace-hook fallback used when a new aiohttp lacks the switch."""
    if request.param == "guard":
        monkeypatch.setitem(aiohttp_compat.FAST_PATHS, "aiohttp.no_hidden_retries", False)
    yield request.param


# -- item 1: no hidden re-sends ------------------------------------------------------------


def first_answered_then_silent() -> Any:
    """The first request of the first connection gets a 200 (so the connection is pooled);
    every later request, on any connection, is read and left unanswered (closed)."""
    async def run(conn: WireConn) -> None:
        first = len(conn.upstream.heads) == 0
        if await conn.request() is None:
            return
        if first:
            await conn.answer(ok())
            await conn.request()  # the next request on the reused connection: no answer
    return run


async def test_a_request_read_and_left_unanswered_is_sent_once_without_retry(
        resend_mode: str) -> None:
    async with WireUpstream(first_answered_then_silent()) as up:
        rt = engine(up.url)
        try:
            assert (await get(rt)).status_code == 200
            r = await get(rt, "/second")
        finally:
            await rt.aclose()
    assert r.status_code == 502 and r.headers["x-riprap-reason"] == "upstream-failed"
    assert r.headers["x-riprap-attempts"] == "1"
    assert [h.split(b"\r\n")[0] for h in up.heads] == [b"GET / HTTP/1.1",
                                                       b"GET /second HTTP/1.1"]


async def test_an_upstream_gets_a_request_exactly_as_often_as_x_riprap_attempts_says(
        resend_mode: str) -> None:
    async with WireUpstream(first_answered_then_silent()) as up:
        rt = engine(up.url, retry=RetrySpec(retries=2, on=("reset",)))
        try:
            assert (await get(rt)).status_code == 200
            r = await get(rt, "/again")
        finally:
            await rt.aclose()
    assert r.status_code == 502 and r.headers["x-riprap-attempts"] == "3"
    assert sum(h.startswith(b"GET /again ") for h in up.heads) == 3


async def test_hidden_resends_do_not_bypass_the_breaker(resend_mode: str) -> None:
    breaker = BreakerSpec(kind="consecutive", failures=1, open=30.0)
    async with WireUpstream(first_answered_then_silent()) as up:
        rt = engine(up.url, breaker=breaker)
        try:
            assert (await get(rt)).status_code == 200
            assert (await get(rt, "/a")).status_code == 502  # one failure: the breaker opens
            r = await get(rt, "/b")
        finally:
            await rt.aclose()
    assert r.headers["x-riprap-reason"] == "breaker-open"
    assert len(up.heads) == 2  # /b never left, /a left once


# -- item 2: header bytes as sent --------------------------------------------------------


async def test_header_bytes_reach_the_upstream_as_the_client_sent_them() -> None:
    async with WireUpstream() as up:
        rt = engine(up.url)
        try:
            r = await get(rt, headers=[(b"X-Name", b"caf\xe9"),            # latin-1
                                       (b"X-Utf8", "café".encode()),      # UTF-8
                                       (b"X-Sig", b"\xff\x80 raw"),
                                       (b"X-Plain", b"ascii")])
        finally:
            await rt.aclose()
    assert r.status_code == 200
    head = up.heads[0]
    assert b"\r\nX-Name: caf\xe9\r\n" in head
    assert b"\r\nX-Utf8: caf\xc3\xa9\r\n" in head  # not double-encoded
    assert b"\r\nX-Sig: \xff\x80 raw\r\n" in head
    assert b"\r\nX-Plain: ascii\r\n" in head


async def test_a_utf8_header_alone_is_not_re_encoded_either() -> None:
    async with WireUpstream() as up:
        rt = engine(up.url)
        try:
            await get(rt, headers=[(b"X-Utf8", "naïve ☃".encode())])
        finally:
            await rt.aclose()
    assert b"\r\nX-Utf8: " + "naïve ☃".encode() + b"\r\n" in up.heads[0]


async def test_without_the_raw_header_path_non_ascii_headers_are_refused_not_re_encoded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(aiohttp_compat.FAST_PATHS, "aiohttp.raw_header_bytes", False)
    async with WireUpstream() as up:
        rt = engine(up.url, retry=RetrySpec(retries=2))
        try:
            r = await get(rt, headers=[(b"X-Name", b"caf\xe9")])
            plain = await get(rt, headers=[(b"X-Name", b"cafe")])
        finally:
            await rt.aclose()
    assert r.status_code == 502 and r.headers["x-riprap-reason"] == "upstream-failed"
    assert "cannot send non-ASCII header bytes" in r.json()["error"]
    assert plain.status_code == 200 and len(up.heads) == 1  # only the ASCII one left


async def test_control_characters_in_a_header_are_still_refused() -> None:
    async with WireUpstream() as up:
        rt = engine(up.url)
        try:
            r = await get(rt, headers=[(b"X-A", b"caf\xe9"), (b"X-B", b"a\nInjected: 1")])
        finally:
            await rt.aclose()
    assert r.status_code == 502 and up.heads == []


# -- item 5: answer heads up to the bounds, and over them ---------------------------------


async def test_answer_heads_within_the_bounds_are_passed_on() -> None:
    cookie = b"Set-Cookie: s=" + b"c" * 8200 + b"\r\n"
    many = b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(200))
    answers = iter([ok(b"one", cookie), ok(b"two", many),
                    ok(b"three", b"X-Big: " + b"v" * 60_000 + b"\r\n")])

    async def run(conn: WireConn) -> None:
        while await conn.request() is not None:
            await conn.answer(next(answers))

    async with WireUpstream(run) as up:
        rt = engine(up.url)
        try:
            a, b, c = await get(rt), await get(rt), await get(rt)
        finally:
            await rt.aclose()
    assert (a.status_code, a.text, len(a.headers["set-cookie"])) == (200, "one", 8202)
    assert (b.status_code, b.text, b.headers["x-h199"]) == (200, "two", "199")
    assert (c.status_code, c.text, len(c.headers["x-big"])) == (200, "three", 60_000)


@pytest.mark.parametrize("extra", [
    b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(300)),           # over 256 headers
    b"Set-Cookie: s=" + b"c" * 70_000 + b"\r\n",                         # one line over 64 KiB
    b"".join(b"X-H%d: " % i + b"v" * 20_000 + b"\r\n" for i in range(4)),  # 80 KiB in all
], ids=["300-headers", "70KiB-line", "80KiB-head"])
async def test_an_answer_head_over_the_bounds_is_a_502_not_retried_nor_held_against_the_endpoint(
        extra: bytes) -> None:
    answers = [ok(b"big", extra), ok(b"small")]

    async def run(conn: WireConn) -> None:
        while await conn.request() is not None:
            await conn.answer(answers[0] if len(conn.upstream.heads) == 1 else answers[1])

    breaker = BreakerSpec(kind="consecutive", failures=1)
    async with WireUpstream(run) as up:
        rt = engine(up.url, retry=RetrySpec(retries=3), breaker=breaker,
                    outlier=OutlierSpec(failures=1))
        try:
            r = await get(rt)
            after = await get(rt)
            state = rt.snapshot()["services"]["api"]
        finally:
            await rt.aclose()
    assert r.status_code == 502 and r.headers["x-riprap-reason"] == "upstream-failed"
    assert r.headers["x-riprap-attempts"] == "1"
    assert "head is over 64 KiB or 256 headers" in r.json()["error"]
    assert (after.status_code, after.text) == (200, "small")  # breaker closed, not ejected
    assert state["breaker"]["state"] == "closed" and state["breaker"]["failures"] == 0
    assert state["endpoints"][0]["ejected"] is False
    assert len(up.heads) == 2


# -- item 11: a stray answer on an idle pooled connection ----------------------------------


async def test_bytes_on_an_idle_pooled_connection_close_it_and_never_answer_the_next_call(
        ) -> None:
    sent_stray = asyncio.Event()

    async def run(conn: WireConn) -> None:
        if len(conn.upstream.conns) == 1:
            await conn.request()
            await conn.answer(ok(b"first"))
            await asyncio.sleep(0.05)  # the answer was read and the connection pooled
            await conn.answer(ok(b"STRAY", b"x-stray: 1\r\n"))
            sent_stray.set()
            await conn.wait_closed_by_peer()
            return
        await keep_alive(ok(b"second"))(conn)

    async with WireUpstream(run) as up:
        rt = engine(up.url)
        try:
            assert (await get(rt)).text == "first"
            await asyncio.wait_for(sent_stray.wait(), 5)
            # riprap closes the poisoned connection (aiohttp alone keeps it pooled)
            assert await wait_for(up.conns[0].peer_closed.is_set, 3.0)
            r = await get(rt, "/next")
        finally:
            await rt.aclose()
    assert (r.status_code, r.text, "x-stray" in r.headers) == (200, "second", False)
    assert len(up.conns) == 2 and up.conns[1].heads[0].startswith(b"GET /next ")


async def test_a_second_answer_in_the_same_packet_is_never_handed_to_the_next_call() -> None:
    async def run(conn: WireConn) -> None:
        if len(conn.upstream.conns) == 1:
            await conn.request()
            await conn.answer(ok(b"first") + ok(b"STRAY"))
            await conn.wait_closed_by_peer()
            return
        await keep_alive(ok(b"second"))(conn)

    async with WireUpstream(run) as up:
        rt = engine(up.url)
        try:
            assert (await get(rt)).text == "first"
            r = await get(rt, "/next")
        finally:
            await rt.aclose()
    assert r.text == "second"


async def test_a_100_continue_does_not_count_as_the_answer() -> None:
    async def run(conn: WireConn) -> None:
        while await conn.request() is not None:
            await conn.answer(b"HTTP/1.1 100 Continue\r\n\r\n")
            await asyncio.sleep(0.02)
            await conn.answer(ok(b"final"))

    async with WireUpstream(run) as up:
        rt = engine(up.url)
        try:
            a, b = await get(rt), await get(rt)
        finally:
            await rt.aclose()
    assert (a.text, b.text) == ("final", "final")
    assert len(up.conns) == 1  # the connection was reused: the 100 did not poison it


async def test_an_upgraded_connection_keeps_its_bytes() -> None:
    """After a 101 the connection belongs to the upgraded protocol: its frames are not
    "bytes nobody asked for" (aiohttp's WebSocket client runs on the same protocol)."""
    import aiohttp

    async def run(conn: WireConn) -> None:
        head = await conn.request()
        assert head is not None
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))
        import base64
        import hashlib
        accept = base64.b64encode(hashlib.sha1(
            key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        await conn.answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        await asyncio.sleep(0.05)
        await conn.answer(b"\x81\x05hello")  # one unmasked text frame
        await conn.wait_closed_by_peer()

    async with WireUpstream(run) as up:
        t = AiohttpTransport()
        try:
            async with t.session.ws_connect(up.url + "/ws") as ws:
                msg = await asyncio.wait_for(ws.receive(), 5)
        finally:
            await t.aclose()
    assert msg.type == aiohttp.WSMsgType.TEXT and msg.data == "hello"
