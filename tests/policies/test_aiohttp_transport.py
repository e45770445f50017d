"""AiohttpTransport against real sockets on 127.0.0.1: a raw asyncio server that can
answer, stream, hang, reset or refuse, so every error mapping is pinned exactly."""

from __future__ import annotations

import asyncio
import gzip
from typing import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import pytest_asyncio

from dsl.plan import EndpointSpec, Plan, RetrySpec, ServicePlan
from policies.aiohttp_transport import AiohttpTransport
from policies.transport import ResilientTransport

Conn = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One HTTP/1.1 request: head line, headers (lower-cased), body (length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
    body = b""
    if b"content-length" in headers:
        body = await reader.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding") == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    return lines[0], headers, body


class RawServer:
    """A 127.0.0.1 server whose per-connection behaviour a test sets; records requests."""

    def __init__(self) -> None:
        self.behaviour: Conn | None = None
        self.requests: list[tuple[bytes, dict[bytes, bytes], bytes]] = []
        self.connections = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            assert self.behaviour is not None
            await self.behaviour(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest_asyncio.fixture
async def server() -> AsyncIterator[RawServer]:
    srv = RawServer()
    await srv.start()
    yield srv
    await srv.stop()


@pytest_asyncio.fixture
async def transport() -> AsyncIterator[AiohttpTransport]:
    t = AiohttpTransport(connect_timeout=1.0)
    yield t
    await t.aclose()


def keepalive(body: bytes = b"hello", extra: bytes = b"") -> Conn:
    """Answer every request on the connection with `body` (keep-alive)."""
    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        srv_requests = conn.requests  # type: ignore[attr-defined]
        while True:
            try:
                req = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            srv_requests.append(req)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s"
                         % (len(body), extra, body))
            await writer.drain()
    return conn


def use(server: RawServer, conn: Conn) -> None:
    conn.requests = server.requests  # type: ignore[attr-defined]
    server.behaviour = conn


async def test_a_request_goes_out_as_written_and_the_answer_comes_back(
        server: RawServer, transport: AiohttpTransport) -> None:
    use(server, keepalive(b"hello", b"x-up: 1\r\n"))
    async with httpx.AsyncClient(transport=transport) as client:
        r = await client.post(f"{server.url}/a/b?q=%20x", content=b"payload",
                              headers={"x-custom": "yes", "user-agent": "app/1"})
    assert (r.status_code, r.text, r.headers["x-up"]) == (200, "hello", "1")
    line, headers, body = server.requests[0]
    assert line == b"POST /a/b?q=%20x HTTP/1.1"
    assert body == b"payload" and headers[b"content-length"] == b"7"
    assert headers[b"x-custom"] == b"yes" and headers[b"user-agent"] == b"app/1"
    assert headers[b"host"] == f"127.0.0.1:{server.port}".encode()


async def test_no_headers_are_added_and_bodies_are_not_decompressed(
        server: RawServer, transport: AiohttpTransport) -> None:
    packed = gzip.compress(b"zipped text")
    use(server, keepalive(packed, b"content-encoding: gzip\r\n"))
    req = httpx.Request("GET", f"{server.url}/", headers=[(b"host", f"127.0.0.1:{server.port}".encode())])
    r = await transport.handle_async_request(req)
    raw = b"".join([c async for c in r.stream])  # type: ignore[union-attr]
    await r.aclose()
    assert raw == packed
    _, headers, _ = server.requests[0]
    assert set(headers) == {b"host"}  # no Accept, Accept-Encoding, User-Agent of aiohttp's own


async def test_connections_are_kept_alive_and_reused(server: RawServer,
                                                     transport: AiohttpTransport) -> None:
    use(server, keepalive())
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(3):
            assert (await client.get(f"{server.url}/")).text == "hello"
    assert server.connections == 1 and len(server.requests) == 3


async def test_a_streamed_request_body_is_sent_chunked(server: RawServer,
                                                       transport: AiohttpTransport) -> None:
    use(server, keepalive())

    async def body() -> AsyncIterator[bytes]:
        yield b"one,"
        yield b"two"

    async with httpx.AsyncClient(transport=transport) as client:
        r = await client.put(f"{server.url}/up", content=body())
    assert r.status_code == 200
    _, headers, got = server.requests[0]
    assert got == b"one,two" and headers[b"transfer-encoding"] == b"chunked"


async def test_a_chunked_answer_streams_as_it_arrives(server: RawServer,
                                                      transport: AiohttpTransport) -> None:
    second = asyncio.Event()

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nfirst \r\n")
        await writer.drain()
        await second.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()

    use(server, conn)
    async with httpx.AsyncClient(transport=transport) as client:
        async with client.stream("GET", f"{server.url}/sse") as r:
            chunks = r.aiter_raw()
            assert await chunks.__anext__() == b"first "  # before the rest was even written
            second.set()
            assert await chunks.__anext__() == b"second"


async def test_a_refused_connection_is_a_connect_error(transport: AiohttpTransport) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(httpx.ConnectError):
        await transport.handle_async_request(httpx.Request("GET", f"http://127.0.0.1:{port}/"))


async def test_a_reset_before_the_answer_is_a_protocol_error(server: RawServer,
                                                            transport: AiohttpTransport) -> None:
    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.transport.abort()  # RST, no answer

    use(server, conn)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        await transport.handle_async_request(httpx.Request("POST", f"{server.url}/", content=b"x"))


async def test_a_body_cut_short_is_a_protocol_error_while_streaming(
        server: RawServer, transport: AiohttpTransport) -> None:
    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()
        writer.transport.abort()

    use(server, conn)
    r = await transport.handle_async_request(httpx.Request("GET", f"{server.url}/"))
    assert r.status_code == 200
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        async for _ in r.stream:  # type: ignore[union-attr]
            pass
    await r.aclose()


async def test_a_hanging_upstream_hits_the_read_timeout(server: RawServer,
                                                        transport: AiohttpTransport) -> None:
    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    use(server, conn)
    req = httpx.Request("GET", f"{server.url}/",
                        extensions={"timeout": {"connect": 1.0, "read": 0.05, "write": 1.0, "pool": 1.0}})
    with pytest.raises(httpx.ReadTimeout):
        await transport.handle_async_request(req)


async def test_a_cancelled_call_frees_its_connection(server: RawServer,
                                                     transport: AiohttpTransport) -> None:
    hung = asyncio.Event()

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        hung.set()
        await reader.read()  # until the client closes the connection

    use(server, conn)
    call = asyncio.ensure_future(transport.handle_async_request(httpx.Request("GET", f"{server.url}/")))
    await asyncio.wait_for(hung.wait(), 2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    connector = transport.session.connector
    assert connector is not None
    await asyncio.sleep(0)
    assert len(connector._acquired) == 0  # type: ignore[attr-defined]


async def test_a_slow_upstream_answers_within_the_deadline_through_the_engine(
        server: RawServer) -> None:
    """The engine over the aiohttp transport, on the real clock: a slow first endpoint is
    retried on a healthy one after its per-try timeout (real waits of 30 ms)."""
    slow = RawServer()

    async def slow_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(1)

    slow.behaviour = slow_conn
    await slow.start()
    use(server, keepalive(b"fast"))
    spec = ServicePlan(name="api", endpoints=(EndpointSpec(slow.url), EndpointSpec(server.url)),
                       balance="round-robin", timeout=1.0,
                       retry=RetrySpec(retries=1, on=("timeout",), per_try_timeout=0.03))
    rt = ResilientTransport(Plan(services={"api": spec}))
    try:
        async with httpx.AsyncClient(transport=rt) as client:
            r = await client.get("http://api/x")
        assert (r.status_code, r.text, r.headers["x-riprap-attempts"]) == (200, "fast", "2")
    finally:
        await slow.stop()


async def test_the_session_is_created_lazily_and_closed(server: RawServer) -> None:
    use(server, keepalive())
    t = AiohttpTransport()
    assert t._session is None  # nothing bound to a loop before the first request
    r = await t.handle_async_request(httpx.Request("GET", f"{server.url}/"))
    await r.aread()
    await r.aclose()
    session = t.session
    await t.aclose()
    assert session.closed
    with pytest.raises(RuntimeError):
        _ = t.session


@pytest.mark.parametrize("method,status", [("GET", 204), ("GET", 304), ("HEAD", 200)])
async def test_a_stray_body_after_a_bodiless_answer_is_dropped(
        server: RawServer, transport: AiohttpTransport, method: str, status: int) -> None:
    """Python's http.server handlers often write a body after a 204 (RFC 9110 forbids
    it). The answer is kept, the stray bytes dropped, and the connection not reused."""
    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line, _, _ = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            code = status if line.startswith(method.encode()) and b"/odd" in line else 200
            writer.write(b"HTTP/1.1 %d X\r\ncontent-length: 10\r\n\r\nA says %d" % (code, code))
            await writer.drain()

    use(server, conn)
    first = await transport.handle_async_request(httpx.Request(method, f"{server.url}/odd"))
    assert first.status_code == status and await first.aread() == b""
    await first.aclose()
    second = await transport.handle_async_request(httpx.Request("GET", f"{server.url}/next"))
    assert second.status_code == 200 and await second.aread() == b"A says 200"
    await second.aclose()
    assert server.connections == 2  # the poisoned connection was not reused


async def test_a_garbled_answer_is_still_a_protocol_error(server: RawServer,
                                                         transport: AiohttpTransport) -> None:
    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    use(server, conn)
    with pytest.raises(httpx.RemoteProtocolError):
        await transport.handle_async_request(httpx.Request("GET", f"{server.url}/"))
