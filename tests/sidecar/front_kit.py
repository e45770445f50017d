"""Raw-socket tools for the sidecar's client side: exact bytes in, exact bytes out.

* `RawUpstream`: a loopback TCP server (its own thread) that records every byte each
  connection sends it, splits them into requests (head + Content-Length body), and
  answers each with a fixed answer (or holds it: `hang`).
* `raw_exchange`: send exact bytes to a port, read until the answer is complete or the
  connection closes.
* `Answer`: a parsed answer (status, headers as bytes, body).
* `ws_echo_upstream`: a `websockets` echo server (its own loop and thread) that also
  closes with a chosen code on `close:CODE` and drops the connection on `drop`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

OK_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    closed: bool  # the server closed the connection after this answer
    raw: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def parse_answer(raw: bytes, closed: bool) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers.append((k.strip(), v.strip()))
    return Answer(status, headers, body, closed, raw)


def read_answer(sock: socket.socket, timeout: float = 10.0, *, head_only: bool = False,
                method: bytes = b"GET") -> Answer:
    """Read one answer: up to its Content-Length, its last chunk, or the close."""
    sock.settimeout(timeout)
    buf = b""
    closed = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b"\r\n\r\n" in buf:
            head, _, body = buf.partition(b"\r\n\r\n")
            low = head.lower()
            status = int(head.split(b" ")[1])
            if head_only or method == b"HEAD" or status in (101, 204, 304) or 100 <= status < 200:
                return parse_answer(buf, closed)
            if b"\r\ncontent-length:" in low:
                n = int(low.split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
                if len(body) >= n:
                    return parse_answer(buf, closed)
            elif b"\r\ntransfer-encoding: chunked" in low:
                if body.endswith(b"0\r\n\r\n"):
                    return parse_answer(buf, closed)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            data = b""
        if not data:
            closed = True
            break
        buf += data
    if not buf:
        raise AssertionError("no answer (the connection closed or timed out with nothing)")
    return parse_answer(buf, closed)


def is_closed(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer closes the connection within `timeout` (reading nothing else)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def raw_exchange(port: int, data: bytes, timeout: float = 10.0, method: bytes = b"GET") -> Answer:
    with connect(port) as sock:
        sock.sendall(data)
        return read_answer(sock, timeout, method=method)


@dataclass
class Received:
    """One request as the upstream got it."""

    raw: bytes
    conn: int

    @property
    def line(self) -> bytes:
        return self.raw.split(b"\r\n", 1)[0]

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        head = self.raw.split(b"\r\n\r\n", 1)[0]
        out = []
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            out.append((k, v.strip()))
        return out


@dataclass
class RawUpstream:
    """Records every byte; answers each request with `answer` (unless `hang`)."""

    answer: bytes = OK_ANSWER
    hang: bool = False
    requests: list[Received] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self.connections += 1
                n = self.connections
            threading.Thread(target=self._conn, args=(conn, n), daemon=True).start()

    def _conn(self, conn: socket.socket, n: int) -> None:
        buf = b""
        conn.settimeout(30)
        try:
            while not self._stop:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.lower().split(b"\r\n")[1:]:
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                while len(rest) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    rest += data
                with self._lock:
                    self.requests.append(Received(head + b"\r\n\r\n" + rest[:length], n))
                buf = rest[length:]
                if self.hang:
                    while conn.recv(65536):
                        pass
                    return
                conn.sendall(self.answer)
        except OSError:
            pass
        finally:
            conn.close()

    def wait_requests(self, n: int, timeout: float = 5.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= n:
                    return list(self.requests)
            time.sleep(0.01)
        raise AssertionError(f"the upstream got {len(self.requests)} requests, not {n}")

    def stop(self) -> None:
        self._stop = True
        self.sock.close()


class WsEcho:
    """A websockets echo server on its own loop/thread (`close:CODE`, `drop` commands)."""

    def __init__(self, ssl_context: Any = None) -> None:
        self.ssl_context = ssl_context
        self.port = 0
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.handshakes: list[dict[str, str]] = []
        self.close_codes: list[int | None] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(10):
            raise AssertionError("the WebSocket echo server did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        from websockets.asyncio.server import serve

        async def handler(ws: Any) -> None:
            self.handshakes.append({"path": ws.request.path,
                                    **{k.lower(): v for k, v in ws.request.headers.raw_items()}})
            try:
                async for msg in ws:
                    if msg == "drop":
                        ws.transport.abort()
                        return
                    if isinstance(msg, str) and msg.startswith("close:"):
                        await ws.close(int(msg[6:]), "as asked")
                        return
                    await ws.send(msg)
            finally:
                self.close_codes.append(ws.close_code)

        self.stop_event = asyncio.Event()
        async with serve(handler, "127.0.0.1", 0, max_size=None, compression=None,
                         ssl=self.ssl_context) as server:
            self.server = server
            self.port = server.sockets[0].getsockname()[1]
            self.ready.set()
            await self.stop_event.wait()

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


def ws_echo_upstream() -> Iterator[WsEcho]:
    server = WsEcho()
    try:
        yield server
    finally:
        server.stop()
