"""The proxy listener: a lean raw-ASGI adapter from an incoming call to `ResilientTransport`.

Per call: route (two dict lookups), copy the headers minus hop-by-hop ones, wrap the ASGI
body as a streaming `httpx.AsyncByteStream`, call `transport.handle_async_request`
directly (no `httpx.AsyncClient` on the hot path), then stream the answer back chunk by
chunk. Every policy decision (retries, breakers, fallbacks, deadlines, `x-riprap-*`
headers) belongs to the transport; this module only moves bytes and notices clients that
go away: a small watcher task waits for `http.disconnect` once the request body is read
and cancels the call, which makes the transport cancel its attempts and free its slots.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable, Protocol

import httpx

from policies.headers import HOP_BY_HOP, connection_named
from policies.httpx_compat import build_request, make_url
from policies.httpx_compat import header_items as _header_items
from sidecar.logs import AccessLog
from sidecar.metrics import UNKNOWN_SERVICE, SidecarMetrics
from sidecar.routing import ABSOLUTE_TARGET_KEY, Refusal, Route, Router
from sidecar.upgrade import UPGRADE_HEADER
from sidecar.uvicorn_compat import TARGET_KEY, TUNNEL_KEY, UPGRADE_KEY
from sidecar.ws_relay import Tunnel

log = logging.getLogger("riprap.proxy")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Not hop-by-hop, but owned by this hop: the transport sets Host to the endpoint's
# authority, `Expect: 100-continue` was already answered by uvicorn, and the upgrade
# marker is riprap's own (a client cannot set it).
_DROP_REQUEST = HOP_BY_HOP | {b"host", b"expect", UPGRADE_HEADER}
SERVICE_EXTENSION = "riprap.service"
_NO_BODY_STATUSES = frozenset({204, 304})


class Runtime(Protocol):
    """What the proxy needs from the plan holder: the current router and the transport."""

    router: Router

    @property
    def transport(self) -> httpx.AsyncBaseTransport: ...


class ClientDisconnected(Exception):
    """The client went away while its request body was being read."""


class UpstreamBodyBroken(Exception):
    """The upstream's body broke after the answer's headers were sent to the client.

    Raised out of the ASGI app on purpose: the only way to tell the client that the body
    is incomplete is to close the connection, which uvicorn does for an app exception.
    """


class QuietBrokenBodies(logging.Filter):
    """Drops uvicorn's traceback for `UpstreamBodyBroken` (already logged as one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, UpstreamBodyBroken)


# Most calls end within this; only longer ones get a task watching for `http.disconnect`
# (a timer is far cheaper than a task per call). A client that goes away is noticed at
# most this late.
WATCH_AFTER = 0.025


class _Call:
    """Per-call state shared by the proxy, the request body stream and the watcher."""

    __slots__ = ("receive", "task", "watcher", "timer", "gone", "finished")

    def __init__(self, receive: Receive, task: asyncio.Task[Any] | None) -> None:
        self.receive = receive
        self.task = task
        self.watcher: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.gone = False
        self.finished = False

    def body_read(self) -> None:
        """The request body is fully read: soon, start watching for the client going away."""
        if self.timer is None and self.task is not None and not self.finished:
            self.timer = asyncio.get_running_loop().call_later(WATCH_AFTER, self._start_watch)

    def _start_watch(self) -> None:
        if self.watcher is None and not self.finished:
            self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                if not self.finished and self.task is not None:
                    self.gone = True
                    self.task.cancel()
                return

    def client_gone(self) -> None:
        self.gone = True
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    def close(self) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        if self.watcher is not None and not self.watcher.done():
            self.watcher.cancel()


class _RequestBody(httpx.AsyncByteStream):
    """The ASGI request body as an httpx stream, read once, chunk by chunk."""

    __slots__ = ("call",)

    def __init__(self, call: _Call) -> None:
        self.call = call

    async def __aiter__(self) -> Any:
        call = self.call
        while True:
            msg = await call.receive()
            if msg["type"] == "http.request":
                body = msg.get("body", b"")
                if body:
                    yield body
                if not msg.get("more_body", False):
                    call.body_read()
                    return
            else:
                call.client_gone()
                raise ClientDisconnected("client disconnected while sending the request body")


# No body: an already-read empty body, so that transports send no body framing at all.
_NO_BODY = httpx.ByteStream(b"")




def _forward_items(headers: list[tuple[bytes, bytes]]
                   ) -> tuple[list[tuple[bytes, bytes, bytes]], str | None, bool]:
    """Request headers minus hop-by-hop ones, as `(name, lower-cased name, value)` (the
    shape `httpx.Headers` keeps); also the Host and whether a body follows.

    Names keep the case the client sent (riprap's protocol passes it on; ASGI servers
    that lower-case names give lower-case ones).
    """
    host: str | None = None
    has_body = False
    named: set[bytes] | None = None
    out: list[tuple[bytes, bytes, bytes]] = []
    for name, v in headers:
        k = name if name.islower() else name.lower()
        if k in _DROP_REQUEST:
            if k == b"host":
                host = v.decode("latin-1")
            elif k == b"connection":
                named = connection_named(v, named)
            elif k == b"transfer-encoding":
                has_body = True
            continue
        if k == b"content-length" and v != b"0":
            has_body = True
        out.append((name, k, v))
    if named:
        out = [item for item in out if item[1] not in named]
    return out, host, has_body


def _forward_headers(headers: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]],
                                                                   str | None, bool]:
    """Request headers minus hop-by-hop ones; also the Host and whether a body follows."""
    items, host, has_body = _forward_items(headers)
    return [(k, v) for k, _, v in items], host, has_body


def _answer_headers(items: Any) -> tuple[list[tuple[bytes, bytes]], int]:
    """`(name, lower-cased name, value)` triples minus hop-by-hop ones, as lower-cased
    pairs; and the content-length or -1."""
    named: set[bytes] | None = None
    out: list[tuple[bytes, bytes]] = []
    length = -1
    for _, k, v in items:
        if k in HOP_BY_HOP:
            if k == b"connection":
                named = connection_named(v, named)
            continue
        if k == b"content-length":
            try:
                length = int(v)
            except ValueError:
                continue
        out.append((k, v))
    if named:
        out = [(k, v) for k, v in out if k not in named]
    return out, length


def _response_headers(raw: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], int]:
    """Answer headers minus hop-by-hop ones (lower-cased), and the content-length or -1."""
    return _answer_headers([(k, k.lower(), v) for k, v in raw])


def climbs(target: bytes) -> bool:
    """Whether the path's `..` segments would climb above its root (and so above the
    endpoint's own path prefix). `%2e` counts as `.`, and `%2f` and `\\` (and `%5c`) as
    `/`, as some upstreams decode them before resolving dot segments."""
    path = target.partition(b"?")[0]
    if b"." not in path and b"%" not in path:
        return False
    low = path.lower()
    if b"%" in low:
        low = low.replace(b"%2e", b".").replace(b"%2f", b"/").replace(b"%5c", b"/")
    if b"." not in low:
        return False
    depth = 0
    for seg in low.replace(b"\\", b"/").split(b"/")[1:]:
        if seg == b"..":
            if depth == 0:
                return True
            depth -= 1
        elif seg != b".":
            depth += 1
    return False


def _bad_request(message: str) -> Refusal:
    body = json.dumps({"error": message, "reason": "bad-request"}).encode()
    return Refusal(400, "bad-request", body)


def _target_problem(target: bytes) -> Refusal | None:
    """A routed target that cannot be forwarded safely: 400."""
    if climbs(target):
        return _bad_request("the path climbs above its root with '..' segments")
    return None


class ProxyApp:
    """The ASGI app of the proxy listener."""

    def __init__(self, runtime: Runtime, metrics: SidecarMetrics,
                 access_log: AccessLog | None = None) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.access_log = access_log
        self.active = 0  # calls in flight; read by the riprap_in_flight gauge at scrape time
        metrics.in_flight_source = lambda: self.active

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One coroutine per call: the HTTP path is inlined here, not a nested `await`.
        if scope["type"] != "http":
            await self._other(scope, receive, send)
            return
        method: str = scope["method"]
        items, host, has_body = _forward_items(scope["headers"])
        raw_target: bytes | None = scope.get(TARGET_KEY)
        if raw_target is None:  # another server (tests drive the app in-process)
            raw_target = scope.get("raw_path") or scope["path"].encode()
            query: bytes = scope.get("query_string", b"")
            if query:
                raw_target = raw_target + b"?" + query
        decision = self.runtime.router.route(method, host, raw_target,
                                             scope.get(ABSOLUTE_TARGET_KEY))
        if type(decision) is not Route:
            await self._refuse(decision, method, raw_target, send)  # type: ignore[arg-type]
            return
        service, target = decision
        problem = _target_problem(target)
        if problem is not None:
            await self._refuse(problem, method, raw_target, send)
            return
        upgrade = scope.get(UPGRADE_KEY)
        if upgrade is not None:
            await self._upgrade(scope, receive, send, service, target, items, upgrade)
            return
        call = _Call(receive, asyncio.current_task())
        request = build_request(method, make_url(service, target), items,
                                _RequestBody(call) if has_body else _NO_BODY,
                                None if has_body else b"", {SERVICE_EXTENSION: service})
        if not has_body:
            call.body_read()  # the watcher takes the (empty) body message
        access = self.access_log
        rec = token = None
        if access is not None:
            rec, token = access.begin(method, target.decode("latin-1"), service)
        self.active += 1
        status = 499  # nginx's "client closed request", for the access log
        response: httpx.Response | None = None
        try:
            try:
                response = await self.runtime.transport.handle_async_request(request)
            except (ClientDisconnected, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - an engine bug must not become a 500
                log.exception("the engine failed on a call to %s; answering 502", service)
                response = _engine_failure(service, exc)
            status = response.status_code
            await self._stream_back(response, send, call)
        except asyncio.CancelledError:
            if not call.gone:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            log.debug("client went away: cancelled the call to %s", service)
            status = 499
        except ClientDisconnected:
            status = 499
        finally:
            call.close()
            self.active -= 1
            if response is not None and not response.is_closed:
                await _close_quietly(response)
            if access is not None and rec is not None and token is not None:
                access.end(rec, token, status, outcome="cancelled" if status == 499 else None,
                           attempts=rec.seen if status == 499 else None)

    async def _upgrade(self, scope: Scope, receive: Receive, send: Send, service: str,
                       target: bytes, items: list[tuple[bytes, bytes, bytes]],
                       upgrade: str) -> None:
        """An upgrade request: a WebSocket handshake goes through the plan like a call;
        after the upstream's 101 the connection is relayed (`sidecar.ws_relay`)."""
        method: str = scope["method"]
        tunnel = scope.get(TUNNEL_KEY)
        if method != "GET" or "websocket" not in [t.strip() for t in upgrade.split(",")] \
                or tunnel is None:
            body = json.dumps({
                "error": f"upgrade to {upgrade or 'nothing'!r} is not supported: only "
                         "WebSocket (GET with Upgrade: websocket) is relayed",
                "reason": "upgrade-unsupported"}).encode()
            await self._refuse(Refusal(501, "upgrade-unsupported", body), method, target,
                               send, close=True)
            return
        items.insert(0, (UPGRADE_HEADER, UPGRADE_HEADER, b"websocket"))
        call = _Call(receive, asyncio.current_task())
        request = build_request(method, make_url(service, target), items, _NO_BODY, b"",
                                {SERVICE_EXTENSION: service})
        call.body_read()
        access = self.access_log
        rec = token = None
        if access is not None:
            rec, token = access.begin(method, target.decode("latin-1"), service)
        self.active += 1
        status = 499
        response: httpx.Response | None = None
        try:
            try:
                response = await self.runtime.transport.handle_async_request(request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - an engine bug must not become a 500
                log.exception("the engine failed on an upgrade to %s; answering 502", service)
                response = _engine_failure(service, exc)
            status = response.status_code
            sock = response.extensions.get("network_stream")
            if status != 101 or sock is None:
                await self._stream_back(response, send, call)
                return
            call.close()  # the handshake is over: the tunnel watches the client itself
            headers, _ = _answer_headers(_header_items(response.headers))
            head = [b"HTTP/1.1 101 Switching Protocols\r\n"]
            for k, v in headers:
                head += [k, b": ", v, b"\r\n"]
            up = response.headers.get("upgrade", "websocket").encode("latin-1")
            head += [b"upgrade: ", up, b"\r\nconnection: upgrade\r\n\r\n"]
            ended = await Tunnel(tunnel, sock).run(b"".join(head))
            log.debug("WebSocket tunnel to %s ended: %s", service, ended)
        except asyncio.CancelledError:
            if not call.gone:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            status = 499
        finally:
            call.close()
            self.active -= 1
            if response is not None and not response.is_closed:
                await _close_quietly(response)
            if access is not None and rec is not None and token is not None:
                access.end(rec, token, status, outcome="cancelled" if status == 499 else None,
                           attempts=rec.seen if status == 499 else None)

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
        elif kind == "websocket":  # not proxied: riprap speaks plain HTTP calls
            await send({"type": "websocket.close", "code": 1003})

    async def _stream_back(self, response: httpx.Response, send: Send, call: _Call) -> None:
        headers, length = _answer_headers(_header_items(response.headers))
        status = response.status_code
        if length >= 0 and status in _NO_BODY_STATUSES:
            # No body follows; a Content-Length here would make the server wait for one
            # (uvicorn closes the connection), so it is dropped rather than passed on.
            headers = [(k, v) for k, v in headers if k != b"content-length"]
            length = -1
        await send({"type": "http.response.start", "status": status, "headers": headers})
        sent = 0
        done = False
        stream = response.stream
        try:
            # Iterate to the end even after the last byte: the engine's stream wrappers
            # (stale-cache capture, slot release) act when the stream is exhausted.
            async for chunk in stream:  # type: ignore[union-attr]
                if not chunk or done:
                    continue
                sent += len(chunk)
                if sent == length:  # known length reached: one message, no empty tail
                    done = call.finished = True
                await send({"type": "http.response.body", "body": chunk, "more_body": not done})
        except Exception as exc:  # noqa: BLE001 - any broken body (httpx, aiohttp, OS)
            log.warning("upstream body broke after %d bytes (%s): closing the client "
                        "connection", sent, type(exc).__name__)
            raise UpstreamBodyBroken(str(exc)) from exc
        if not done:
            call.finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def refused_early(self, method: str, target: bytes, status: int, reason: str) -> None:
        """A request the server answered itself (malformed, oversized head, bad Host)."""
        self.metrics.refused(reason)
        if self.access_log is not None:
            rec, token = self.access_log.begin(method, target.decode("latin-1"), UNKNOWN_SERVICE)
            self.access_log.end(rec, token, status, outcome=reason, attempts=0)

    async def _refuse(self, refusal: Refusal, method: str, raw_path: bytes, send: Send,
                      close: bool = False) -> None:
        self.metrics.refused(refusal.reason)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(refusal.body)).encode()),
            (b"x-riprap-reason", refusal.reason.encode()),
            (b"x-riprap-attempts", b"0"),
        ]
        if method == "CONNECT" or close:  # no tunnel follows: the connection ends here
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": refusal.body})
        if self.access_log is not None:
            rec, token = self.access_log.begin(method, raw_path.decode("latin-1"),
                                               UNKNOWN_SERVICE)
            self.access_log.end(rec, token, refusal.status, outcome=refusal.reason, attempts=0)


def _engine_failure(service: str, exc: Exception) -> httpx.Response:
    """riprap's own 502 for a call the engine could not handle (it should always answer)."""
    body = json.dumps({"error": f"internal error while calling {service}: "
                                f"{type(exc).__name__}", "reason": "upstream-failed",
                       "service": service}).encode()
    return httpx.Response(502, headers=[(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"x-riprap-reason", b"upstream-failed"),
                                        (b"x-riprap-attempts", b"0")], content=body)


async def _close_quietly(response: httpx.Response) -> None:
    """`response.aclose()`, minus httpx's per-close context manager (which only attaches the
    request to an error, and errors here are swallowed anyway)."""
    try:
        stream = response.stream
        if isinstance(stream, httpx.AsyncByteStream):
            response.is_closed = True
            await stream.aclose()
        else:
            await response.aclose()
    except Exception:  # noqa: BLE001 - a broken stream is already reported
        log.debug("closing an upstream answer failed", exc_info=True)


async def _lifespan(receive: Receive, send: Send) -> None:
    """Accept lifespan events: startup and shutdown are driven by the sidecar server."""
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return

