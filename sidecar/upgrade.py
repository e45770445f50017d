"""The upstream side of an upgrade (WebSocket) handshake, as an httpx transport.

The handshake goes through the engine like any call (routing, `limit`, `concurrency`,
the breaker, retries, `timeout`), so it must be an `httpx.Request` the engine sends to
its inner transport. The engine's attempts carry only headers, so the proxy marks an
upgrade with a first header, `x-riprap-upgrade: websocket` (a client's own header of that
name is dropped at the door). `UpgradeTransport` wraps the real inner transport: a marked
attempt is sent here on a connection of its own, every other one goes to the inner
transport untouched (the check is one comparison on the first header).

The request goes out as the engine built it (target byte for byte, its headers as bytes)
plus `Connection: Upgrade` and `Upgrade: ...`. The answer's head is parsed with
httptools; bounded like a request head (64 KiB, 256 headers). A 101 comes back with the
open connection as `extensions["network_stream"]` (`UpstreamSocket`), which the proxy
relays; closing the answer closes the connection (and releases the engine's slots).
Any other answer comes back with its body streamed, and the connection is closed after.

An `https://` endpoint is called with the service's `tls` statement (CA, client
certificate, SNI), as the engine's own transport does.

Errors map to httpx's: a refused or unreachable upstream is a `ConnectError` (a
connect-failure, retried like any), a timeout while connecting a `ConnectTimeout`, an
upstream that closes or breaks before a whole head a `RemoteProtocolError`.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, AsyncIterator, Coroutine

import httptools
import httpx

from policies.tls import TLS_EXTENSION

UPGRADE_HEADER = b"x-riprap-upgrade"
CONNECT_TIMEOUT = 5.0
HEAD_LIMIT = 64 * 1024
HEADER_COUNT_LIMIT = 256
READ_SIZE = 256 * 1024


def _first_header_getter() -> Any:
    """The first header's lower-cased name and value (httpx's `_list`, checked)."""
    def public(headers: httpx.Headers) -> tuple[bytes, bytes] | None:
        raw = headers.raw
        return (raw[0][0].lower(), raw[0][1]) if raw else None

    def fast(headers: httpx.Headers) -> tuple[bytes, bytes] | None:
        items = headers._list
        return (items[0][1], items[0][2]) if items else None

    try:
        sample = httpx.Headers([(b"X-Riprap-Upgrade", b"websocket"), (b"a", b"b")])
        if fast(sample) == public(sample) == (UPGRADE_HEADER, b"websocket") \
                and fast(httpx.Headers()) is None:
            return fast
    except Exception:  # noqa: BLE001 - httpx internals changed: the public way
        pass
    return public


_first_header = _first_header_getter()


class UpstreamSocket:
    """An upgraded upstream connection: what the upstream sent after its 101, then the
    rest of its bytes; writes go straight to it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 pending: bytes) -> None:
        self.reader = reader
        self.writer = writer
        self.pending = pending

    async def read(self, max_bytes: int = READ_SIZE) -> bytes:
        if self.pending:
            data, self.pending = self.pending, b""
            return data
        return await self.reader.read(max_bytes)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def buffered(self) -> int:
        return self.writer.transport.get_write_buffer_size()

    async def drain(self) -> None:
        await self.writer.drain()

    def close(self) -> None:
        if not self.writer.transport.is_closing():
            self.writer.close()

    def abort(self) -> None:
        self.writer.transport.abort()


class _Head:
    """httptools callbacks for one answer: status, headers, body chunks, completion."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.done_head = False
        self.complete = False
        self.chunks: list[bytes] = []
        self._name = b""
        self.size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= HEADER_COUNT_LIMIT:
            raise ValueError(f"more than {HEADER_COUNT_LIMIT} headers")
        self.headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self.done_head = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class _Body(httpx.AsyncByteStream):
    """A non-101 answer's body (parsed as it arrives); closes the connection on close."""

    def __init__(self, head: _Head, parser: Any, sock: UpstreamSocket,
                 request: httpx.Request) -> None:
        self.head = head
        self.parser = parser
        self.sock = sock
        self.request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        head = self.head
        while True:
            if head.chunks:
                chunks, head.chunks = head.chunks, []
                for chunk in chunks:
                    yield chunk
            if head.complete:
                return
            try:
                data = await self.sock.read()
            except OSError as exc:
                raise httpx.ReadError(str(exc) or type(exc).__name__,
                                      request=self.request) from exc
            if not data:
                return  # close-delimited (or cut short: the client sees it end)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise httpx.RemoteProtocolError(str(exc), request=self.request) from exc

    async def aclose(self) -> None:
        self.sock.close()


class _Tunnel(httpx.AsyncByteStream):
    """A 101 answer's (empty) body; closing it ends the upgraded connection."""

    def __init__(self, sock: UpstreamSocket) -> None:
        self.sock = sock

    async def __aiter__(self) -> AsyncIterator[bytes]:
        return
        yield b""  # pragma: no cover - an empty async generator

    async def aclose(self) -> None:
        self.sock.close()


def _tls(request: httpx.Request) -> tuple[ssl.SSLContext | None, str | None]:
    """The TLS context and server name for an `https://` endpoint: the service's `tls`
    statement (`policies.tls`, carried by the attempt), else the system's trust store."""
    url = request.url
    if url.scheme != "https":
        return None, None
    tls = request.extensions.get(TLS_EXTENSION)
    if tls is not None:
        return tls.context, tls.server_hostname or url.host
    return ssl.create_default_context(), url.host


async def send_upgrade(request: httpx.Request, upgrade: bytes) -> httpx.Response:
    """Send an upgrade request on a new connection; the answer (a 101 keeps it open)."""
    url = request.url
    host = url.host
    port = url.port or (443 if url.scheme == "https" else 80)
    tls, server_name = _tls(request)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=tls, server_hostname=server_name,
                                    limit=READ_SIZE),
            CONNECT_TIMEOUT)
    except TimeoutError as exc:
        raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out",
                                   request=request) from exc
    except OSError as exc:
        raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
    sock = UpstreamSocket(reader, writer, b"")
    try:
        lines = [request.method.encode("ascii"), b" ", url.raw_path, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            if name.lower() in (UPGRADE_HEADER, b"connection", b"upgrade"):
                continue
            lines += [name, b": ", value, b"\r\n"]
        lines += [b"connection: upgrade\r\nupgrade: ", upgrade, b"\r\n\r\n"]
        writer.write(b"".join(lines))
        head = _Head()
        parser = httptools.HttpResponseParser(head)
        seen = 0
        while not head.done_head:
            try:
                data = await reader.read(READ_SIZE)
            except OSError as exc:
                raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
            if not data:
                raise httpx.RemoteProtocolError("the upstream closed the connection before "
                                                "answering the upgrade", request=request)
            seen += len(data)
            if seen > HEAD_LIMIT and not head.done_head:
                # the head may end within this chunk; feed only what the limit allows
                data = data[:max(0, len(data) - (seen - HEAD_LIMIT))]
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                offset = exc.args[0] if exc.args else len(data)
                sock.pending = data[offset:]
            except (httptools.HttpParserError, ValueError) as exc:
                raise httpx.RemoteProtocolError(f"malformed upgrade answer: {exc}",
                                                request=request) from exc
            if seen > HEAD_LIMIT and not head.done_head:
                raise httpx.RemoteProtocolError(
                    f"the upstream's answer head is over {HEAD_LIMIT} bytes", request=request)
        status = parser.get_status_code()
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
        if status == 101:
            extensions["network_stream"] = sock
            stream: httpx.AsyncByteStream = _Tunnel(sock)
        else:
            stream = _Body(head, parser, sock, request)
        return httpx.Response(status, headers=head.headers, stream=stream,
                              extensions=extensions)
    except BaseException:
        sock.abort()
        raise


class UpgradeTransport(httpx.AsyncBaseTransport):
    """The engine's inner transport, with upgrade attempts sent by `send_upgrade`."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    def handle_async_request(
            self, request: httpx.Request) -> Coroutine[Any, Any, httpx.Response]:
        # Not `async`: hands back the inner transport's own coroutine, so an ordinary
        # attempt costs one header comparison and no extra coroutine frame.
        first = _first_header(request.headers)
        if first is None or first[0] != UPGRADE_HEADER:
            return self.inner.handle_async_request(request)
        return send_upgrade(request, first[1])

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:  # the inner transport's own attributes
        return getattr(self.inner, name)


__all__ = ["UPGRADE_HEADER", "UpgradeTransport", "UpstreamSocket", "send_upgrade"]
