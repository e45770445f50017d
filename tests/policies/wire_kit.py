"""A raw-socket upstream on 127.0.0.1 that records every byte it receives and can misbehave
on the wire (close without answering, answer twice, send huge heads), for the tests of
what reaches an upstream and what comes back from it."""

from __future__ import annotations

import asyncio
import ssl
from typing import Awaitable, Callable

Behaviour = Callable[["WireConn"], Awaitable[None]]


class WireConn:
    """One accepted connection: what it received, and the means to answer."""

    def __init__(self, upstream: "WireUpstream", reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.upstream = upstream
        self.reader = reader
        self.writer = writer
        self.received = bytearray()  # every byte, in order
        self.heads: list[bytes] = []  # each request head, as received
        self.peer_cert = writer.get_extra_info("peercert")  # the client's, with mutual TLS
        self.peer_closed = asyncio.Event()  # the client closed its side

    async def request(self) -> bytes | None:
        """Read one request (head, then a Content-Length body); None when the client
        closed the connection. The head is recorded (also in `upstream.heads`)."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.peer_closed.set()
            return None
        self.received += head
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if length:
            body = await self.reader.readexactly(length)
            self.received += body
        self.heads.append(head)
        self.upstream.heads.append(head)
        return head

    async def answer(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def wait_closed_by_peer(self) -> None:
        """Until the client closes the connection (bytes it sends meanwhile are recorded)."""
        while True:
            try:
                data = await self.reader.read(65536)
            except ConnectionError:
                data = b""
            if not data:
                self.peer_closed.set()
                return
            self.received += data


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class WireUpstream:
    """`behaviour(conn)` runs once per accepted connection; the connection is closed when
    it returns. `heads` holds every request head received, on any connection."""

    def __init__(self, behaviour: Behaviour | None = None, *,
                 tls: ssl.SSLContext | None = None) -> None:
        self.behaviour = behaviour or keep_alive()
        self.tls = tls  # a server context: the upstream speaks HTTPS
        self.conns: list[WireConn] = []
        self.heads: list[bytes] = []
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def __aenter__(self) -> "WireUpstream":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for c in self.conns:
            c.writer.close()
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = WireConn(self, reader, writer)
        self.conns.append(conn)
        try:
            await self.behaviour(conn)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the test ended with the handler waiting
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"


def keep_alive(answer: bytes | None = None) -> Behaviour:
    """Answer every request on the connection with `answer` (default a 200 "ok")."""
    async def run(conn: WireConn) -> None:
        while await conn.request() is not None:
            await conn.answer(answer if answer is not None else ok())
    return run


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll until `predicate()` holds (True) or `timeout` passes (False)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.005)
    return True
