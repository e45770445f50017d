"""The one module that touches uvicorn's private names: the sidecar's HTTP/1.1 server side.

riprap serves both listeners with uvicorn's httptools protocol, subclassed here to make
the client side behave as the contract (section 9) says and as nginx does:

* **The request target as sent.** The exact bytes of the target (no normalising); an
  absolute-form target is split into its host (for routing) and its path (empty = `/`);
  `OPTIONS *` stays `*`; raw UTF-8 bytes in the path are accepted (llhttp refuses bytes
  over 0x7f in a URL, so the request line is escaped for the parser, reversibly, and the
  original bytes are restored).
* **Limits.** A head over `HEAD_LIMIT` (64 KiB) or with more than `HEADER_COUNT_LIMIT`
  (256) headers gets 431; the parser is never fed more than the limit (so an endless
  header costs nothing more than 64 KiB). A client that has not sent a whole head within
  `head_timeout` (10 s) is disconnected; an idle keep-alive connection is closed after the
  keep-alive timeout (5 s, uvicorn's own timer).
* **HTTP/1.x rules.** Exactly one `Host` (none in HTTP/1.1, or two: 400); HTTP/1.0
  keep-alive honoured, and HTTP/1.0 answers of unknown length are close-delimited (never
  chunked, RFC 9112 section 6.1).
* **Header names as sent.** On the proxy listener the scope's header names keep the
  client's case (`keep_case`), so they reach the upstream as the client wrote them.
* **Every answer is riprap's or the upstream's.** A malformed request, an oversized head
  or a bad target gets a JSON answer with `x-riprap-reason` (never uvicorn's bare 400),
  and is reported to the `hooks` (access log, metrics).
* **Upgrades.** An upgrade request is handed to the app with `riprap.upgrade` in its
  scope and `riprap.tunnel` (this protocol); once the app has an upstream's 101, it calls
  `start_tunnel`, and from then on the connection's bytes go to the relay
  (`sidecar.ws_relay`), not to the parser.

Fast paths and self-checks: the subclass relies on uvicorn's internals (attribute and
method names of `HttpToolsProtocol` and `RequestResponseCycle`). `_check()` verifies them
at import; when they do not match, `protocol_class()` gives uvicorn's stock httptools
protocol instead (riprap still runs, without these guarantees) and the start-up log says
so. `active_fast_paths()` reports which are in use (shown at `/state`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import urllib.parse
from typing import Any, Callable, Protocol

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HEADER_RE as _HEADER_RE
from uvicorn.protocols.http.httptools_impl import HEADER_VALUE_RE as _HEADER_VALUE_RE
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from sidecar.routing import ABSOLUTE_TARGET_KEY

log = logging.getLogger("riprap.server")

HEAD_LIMIT = 64 * 1024  # bytes of request line + headers
HEADER_COUNT_LIMIT = 256
HEAD_TIMEOUT = 10.0  # seconds to send a whole request head
KEEP_ALIVE_TIMEOUT = 5  # seconds an idle keep-alive connection stays open
EARLY_LIMIT = 1024 * 1024  # bytes a client may send after an upgrade request, before the 101

TARGET_KEY = "riprap.target"  # the origin-form target (path?query) exactly as sent
UPGRADE_KEY = "riprap.upgrade"  # the Upgrade header's value (lower-cased) of an upgrade request
TUNNEL_KEY = "riprap.tunnel"  # the protocol, for `start_tunnel`


class Hooks(Protocol):
    """Told of every answer the protocol makes itself (the app's own are logged by it)."""

    def refused_early(self, method: str, target: bytes, status: int, reason: str) -> None: ...


class Relay(Protocol):
    """What the protocol hands the client's bytes to once a tunnel is up."""

    def from_client(self, data: bytes) -> None: ...

    def client_lost(self, exc: Exception | None) -> None: ...


class _HeadTooLarge(Exception):
    """Raised from a parser callback: the head has too many headers."""


def refusal_bytes(status: int, reason: str, message: str) -> bytes:
    """A whole answer riprap makes itself: JSON body, `x-riprap-reason`, then close."""
    body = json.dumps({"error": message, "reason": reason}).encode()
    return b"".join((
        STATUS_LINE[status], b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body), b"x-riprap-reason: ", reason.encode("ascii"),
        b"\r\nx-riprap-attempts: 0\r\nconnection: close\r\n\r\n", body))


_ESCAPES = {b: b"%%%02X" % b for b in range(256)}


def _escape_line(line: bytes) -> bytes:
    """A request line llhttp accepts: `%` and bytes over 0x7f percent-escaped."""
    esc = _ESCAPES
    return b"".join(esc[c] if (c >= 0x80 or c == 0x25) else bytes((c,)) for c in line)


def _unescape(url: bytes) -> bytes:
    """The inverse of `_escape_line` on the target: every `%XX` back to its byte."""
    return urllib.parse.unquote_to_bytes(url)


def _split_absolute(url: bytes) -> tuple[bytes, bytes] | None:
    """`http://host:port/p?q` -> (`host:port`, `/p?q`); an empty path is `/`."""
    sep = url.find(b"://")
    if sep <= 0 or not url[:sep].isalpha():
        return None
    rest = url[sep + 3:]
    end = len(rest)
    for ch in (b"/", b"?", b"#"):
        i = rest.find(ch)
        if 0 <= i < end:
            end = i
    authority, target = rest[:end], rest[end:]
    authority = authority.rpartition(b"@")[2]
    if not authority:
        return None
    if not target.startswith(b"/"):
        target = b"/" + target
    return authority, target


class RiprapCycle(RequestResponseCycle):
    """uvicorn's request/response cycle, with HTTP/1.0 framing done right and tunnels."""

    tunnel = False

    async def send(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"Expected 'http.response.start', got '{message['type']}'.")
            self.response_started = True
            self.waiting_for_100_continue = False
            status: int = message["status"]
            scope = self.scope
            head_method = scope["method"] == "HEAD"
            http10 = scope["http_version"] == "1.0"
            content = [STATUS_LINE[status]]
            has_close = False
            for name, value in message.get("headers", ()):
                if _HEADER_RE.search(name):
                    raise RuntimeError("Invalid HTTP header name.")
                if _HEADER_VALUE_RE.search(value):
                    raise RuntimeError("Invalid HTTP header value.")
                name = name.lower()
                if name == b"content-length" and self.chunked_encoding is None:
                    self.expected_content_length = int(value.decode())
                    self.chunked_encoding = False
                elif name == b"transfer-encoding" and value.lower() == b"chunked":
                    if http10:  # HTTP/1.0 has no chunked coding: close-delimited instead
                        continue
                    self.expected_content_length = 0
                    self.chunked_encoding = True
                elif name == b"connection":
                    if b"close" in [t.lower().strip() for t in value.split(b",")]:
                        self.keep_alive = False
                        has_close = True
                content.extend([name, b": ", value, b"\r\n"])
            if self.chunked_encoding is None and not head_method and status not in (204, 304):
                if http10:
                    self.keep_alive = False  # the body ends when the connection does
                    self.expected_content_length = -1
                    self.chunked_encoding = False
                else:
                    self.chunked_encoding = True
                    content.append(b"transfer-encoding: chunked\r\n")
            if not self.keep_alive and not has_close:
                content.append(b"connection: close\r\n")
            elif http10 and self.keep_alive:
                content.append(b"connection: keep-alive\r\n")
            content.append(b"\r\n")
            self.transport.write(b"".join(content))
        elif not self.response_complete:
            if message["type"] != "http.response.body":
                raise RuntimeError(f"Expected 'http.response.body', got '{message['type']}'.")
            body = message.get("body", b"")
            more_body = message.get("more_body", False)
            if self.scope["method"] == "HEAD":
                self.expected_content_length = 0
            elif self.chunked_encoding:
                if body:
                    self.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
                                         if not more_body else b"%x\r\n%b\r\n" % (len(body), body))
                elif not more_body:
                    self.transport.write(b"0\r\n\r\n")
            else:
                if self.expected_content_length >= 0:
                    if len(body) > self.expected_content_length:
                        raise RuntimeError("Response content longer than Content-Length")
                    self.expected_content_length -= len(body)
                if body:
                    self.transport.write(body)
            if not more_body:
                if self.expected_content_length > 0:
                    raise RuntimeError("Response content shorter than Content-Length")
                self.response_complete = True
                self.message_event.set()
                if not self.keep_alive:
                    self.transport.close()
                self.on_response()
        else:
            raise RuntimeError(f"Unexpected ASGI message '{message['type']}' sent, after "
                               "response already completed.")


class RiprapHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with riprap's target, limit and upgrade rules."""

    head_limit = HEAD_LIMIT
    header_count_limit = HEADER_COUNT_LIMIT
    head_timeout = HEAD_TIMEOUT
    hooks: Hooks | None = None
    # Header names as the client sent them (the proxy forwards them so); ASGI apps that
    # expect lower-case names (the admin listener's Starlette) get them lower-cased.
    keep_case = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the parser is inside a request head (or between requests)
        self._head_left = self.head_limit
        self._nheaders = 0
        self._hosts = 0
        self._in_line = True  # the next bytes are (part of) a request line
        self._msg_open = False  # the parser is inside a message (begun, not complete)
        self._escaping = False  # this request line is being escaped for llhttp
        self._escape_from = 0  # ... from this offset of `self.url` on
        self._boundary = False  # a message completed during the current feed
        self._head_timer: asyncio.TimerHandle | None = None
        self._done = False  # refused or tunnelled: the parser is fed no more
        self._upgraded = False
        self._early = bytearray()  # bytes after an upgrade request, before the tunnel
        self.relay: Relay | None = None

    # -- connection -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        relay = self.relay
        if relay is not None:
            relay.client_lost(exc)
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        timer = self._head_timer
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self._done and not self.transport.is_closing():
            log.debug("a client sent no whole request head within %.0fs: disconnected",
                      self.head_timeout)
            self.transport.close()

    # -- bytes in ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            relay.from_client(data)
            return
        if self._done:
            return
        if self._upgraded:  # early frames of an upgrade, before the upstream's answer
            self._keep_early(data)
            return
        self._unset_keepalive_if_required()
        if self._in_line:
            data = self._scan_line(data)
        self._boundary = False
        if self._in_head and len(data) > self._head_left:
            # Feed no more than the head may hold: either the head ends within it, or 431.
            left = self._head_left
            if not self._feed(data[:left]):
                return
            if self._upgraded:
                self._keep_early(data[left:])
                return
            if self._in_head and not self._boundary:
                self._refuse(431, "headers-too-large",
                             f"the request head is over {self.head_limit} bytes")
                return
            data = data[left:]
        elif self._in_head:
            self._head_left -= len(data)
        if data and not self._feed(data):
            return
        if not self._msg_open:
            self._in_line = True  # the next bytes start a request
        elif self._boundary:
            self._in_line = False  # pipelined: a request began mid-chunk (not escaped)

    def _scan_line(self, data: bytes) -> bytes:
        """Escape a request line that llhttp would refuse for bytes over 0x7f; once a
        line is being escaped, all of it is (so that `_unescape` restores it exactly)."""
        start = 0 if self._msg_open else len(data) - len(data.lstrip(b"\r\n"))
        end = data.find(b"\n", start)
        line = data[start:] if end < 0 else data[start:end]
        if end >= 0:
            self._in_line = False
        if not self._escaping:
            if line.isascii():
                return data
            self._escaping = True
            self._escape_from = len(self.url) if self._msg_open else 0
        escaped = data[:start] + _escape_line(line)
        return escaped if end < 0 else escaped + data[end:]

    def _keep_early(self, data: bytes) -> None:
        self._early += data
        if len(self._early) > EARLY_LIMIT:
            self.flow.pause_reading()

    def _feed(self, data: bytes) -> bool:
        """Feed the parser; False when the connection was refused."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded = True
            offset = exc.args[0] if exc.args else len(data)
            if offset < len(data):
                self._keep_early(data[offset:])
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._refuse(431, "headers-too-large",
                             f"the request has more than {self.header_count_limit} headers")
            else:
                log.error("a request could not be parsed", exc_info=exc.__context__ or exc)
                self._refuse(400, "bad-request", "the request could not be parsed")
            return False
        except httptools.HttpParserInvalidURLError as exc:
            self._refuse(400, "bad-request", f"malformed request target: {exc}")
            return False
        except httptools.HttpParserError as exc:
            self._refuse(400, "bad-request", f"malformed request: {exc}")
            return False
        return True

    def _refuse(self, status: int, reason: str, message: str,
                target: bytes | None = None) -> None:
        """Answer a request that never reached the app, and stop reading."""
        self._done = True
        self._cancel_head_timer()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False  # an answer is being sent: end after it
            return
        method = "-"
        try:
            method = self.parser.get_method().decode("ascii", "replace")
        except Exception:  # noqa: BLE001 - the method itself may be what is broken
            pass
        hooks = self.hooks
        if hooks is not None:
            shown = target if target is not None else bytes(self.url or b"")
            hooks.refused_early(method, shown[:1024], status, reason)
        if not self.transport.is_closing():
            self.transport.write(refusal_bytes(status, reason, message))
            self.transport.close()

    # -- parser callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._msg_open = True
        self._in_head = True
        self._head_left = self.head_limit
        self._nheaders = 0
        self._hosts = 0
        self._arm_head_timer()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._nheaders += 1
        if self._nheaders > self.header_count_limit:
            raise _HeadTooLarge
        low = name.lower()
        value = value.rstrip(b" \t")  # llhttp keeps trailing whitespace (RFC 9110 5.5)
        if low == b"host":
            self._hosts += 1
        elif low == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name if self.keep_case else low, value))

    def on_headers_complete(self) -> None:
        if self._done:  # pipelined after a refusal: never served
            return
        self._in_head = False
        self._in_line = False
        self._cancel_head_timer()
        parser = self.parser
        http_version = parser.get_http_version()
        method = parser.get_method().decode("ascii")
        scope: Any = self.scope
        scope["method"] = method
        if http_version != "1.1":
            scope["http_version"] = http_version
        url = self.url
        if self._escaping:
            cut = self._escape_from
            url = url[:cut] + _unescape(url[cut:])
            self._escaping = False
        refusal: tuple[int, str, str] | None = None
        keep_alive = parser.should_keep_alive()
        if self._hosts > 1:
            refusal = (400, "bad-request", "more than one Host header")
        elif self._hosts == 0 and http_version == "1.1":
            refusal = (400, "bad-request", "an HTTP/1.1 request without a Host header")
        if method == "CONNECT":
            scope[ABSOLUTE_TARGET_KEY] = url.decode("latin-1")
            target = b"/"
            keep_alive = False
        elif url[:1] == b"/":
            target = url
        elif url == b"*":
            target = url
            if method != "OPTIONS" and refusal is None:
                refusal = (400, "bad-request", "the target '*' is only for OPTIONS")
        else:
            split = _split_absolute(url)
            if split is None:
                target = b"/"
                if refusal is None:
                    refusal = (400, "bad-request", "malformed request target")
            else:
                authority, target = split
                scope[ABSOLUTE_TARGET_KEY] = authority.decode("latin-1")
        path, _, query = target.partition(b"?")
        raw = path.decode("latin-1")
        scope["path"] = urllib.parse.unquote(raw, "latin-1") if "%" in raw else raw
        scope["raw_path"] = path
        scope["query_string"] = query
        scope[TARGET_KEY] = target
        if parser.should_upgrade() and method != "CONNECT":
            upgrade = b""
            for name, value in self.headers:
                if name.lower() == b"upgrade":
                    upgrade = value.strip().lower()
            scope[UPGRADE_KEY] = upgrade.decode("latin-1")
            scope[TUNNEL_KEY] = self
            keep_alive = False  # a refused upgrade ends the connection
        if refusal is not None:
            self._refuse(*refusal, target=url)
            return
        existing = self.cycle
        self.cycle = RiprapCycle(
            scope=scope, transport=self.transport, flow=self.flow, logger=self.logger,
            access_logger=self.access_logger, access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(), expect_100_continue=self.expect_100_continue,
            keep_alive=keep_alive, on_response=self.on_response_complete)
        if existing is None or existing.response_complete:
            self._start_asgi_task(self.cycle, self.app)
        else:
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, self.app))

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if self._done or cycle.response_complete:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_message_complete(self) -> None:
        self._msg_open = False
        self._boundary = True
        self._in_head = True
        self._head_left = self.head_limit
        cycle = self.cycle
        if self._done or cycle.response_complete:
            return
        cycle.more_body = False
        cycle.message_event.set()

    # -- tunnels ------------------------------------------------------------------------

    def start_tunnel(self, head: bytes, relay: Relay) -> bytes:
        """Write the upstream's 101 head and hand the connection to `relay`; returns the
        bytes the client sent after its request (early frames), to go upstream first."""
        self._done = True
        self._cancel_head_timer()
        cycle = self.cycle
        cycle.response_started = True
        if isinstance(cycle, RiprapCycle):
            cycle.tunnel = True
        self.transport.write(head)
        self.relay = relay
        early, self._early = bytes(self._early), bytearray()
        self.flow.resume_reading()
        return early

    def end_tunnel(self) -> None:
        """The tunnel is over: the cycle is complete, the connection closes."""
        cycle = self.cycle
        cycle.response_complete = True
        cycle.keep_alive = False
        if not self.transport.is_closing():
            self.transport.close()

    def shutdown(self) -> None:
        if self.relay is not None:  # a tunnel ends with its own close, after the drain
            return
        super().shutdown()


# -- self-checks ----------------------------------------------------------------------------

_PROTOCOL_ATTRS = ("parser", "url", "headers", "scope", "cycle", "pipeline", "flow",
                   "transport", "server_state", "expect_100_continue", "app", "loop",
                   "connections", "timeout_keep_alive_task")
_PROTOCOL_METHODS = ("on_message_begin", "on_url", "on_header", "on_headers_complete",
                     "on_body", "on_message_complete", "on_response_complete", "data_received",
                     "connection_made", "connection_lost", "_unset_keepalive_if_required",
                     "_start_asgi_task", "shutdown")
_CYCLE_PARAMS = ("scope", "transport", "flow", "logger", "access_logger", "access_log",
                 "default_headers", "message_event", "expect_100_continue", "keep_alive",
                 "on_response")
_CYCLE_ATTRS = ("response_started", "response_complete", "chunked_encoding",
                "expected_content_length", "keep_alive", "waiting_for_100_continue",
                "disconnected", "body", "more_body", "message_event", "on_response")


def _check() -> tuple[bool, str]:
    """Whether uvicorn's internals are those this module was written against."""
    try:
        for name in _PROTOCOL_METHODS:
            if not callable(getattr(HttpToolsProtocol, name, None)):
                return False, f"HttpToolsProtocol.{name} is missing"
        init = inspect.signature(HttpToolsProtocol.__init__).parameters
        if list(init)[1:4] != ["config", "server_state", "app_state"]:
            return False, "HttpToolsProtocol's constructor changed"
        params = list(inspect.signature(RequestResponseCycle.__init__).parameters)[1:]
        if params != list(_CYCLE_PARAMS):
            return False, "RequestResponseCycle's constructor changed"
        source = inspect.getsource(HttpToolsProtocol)
        for attr in _PROTOCOL_ATTRS:
            if f"self.{attr}" not in source:
                return False, f"HttpToolsProtocol no longer has .{attr}"
        cycle_source = inspect.getsource(RequestResponseCycle)
        for attr in _CYCLE_ATTRS:
            if f"self.{attr}" not in cycle_source:
                return False, f"RequestResponseCycle no longer has .{attr}"
        if STATUS_LINE.get(431, b"")[:12] != b"HTTP/1.1 431" or HIGH_WATER_LIMIT <= 0:
            return False, "uvicorn's status lines changed"
        if _unescape(_escape_line(b"/caf\xc3\xa9/%41?x=%")) != b"/caf\xc3\xa9/%41?x=%":
            return False, "the request-line escape does not round-trip"
        return True, ""
    except Exception as exc:  # noqa: BLE001 - any surprise: the stock protocol
        return False, f"{type(exc).__name__}: {exc}"


_PROTOCOL_OK, _PROTOCOL_WHY = _check()


def protocol_class(*, hooks: Hooks | None = None, head_timeout: float = HEAD_TIMEOUT,
                   keep_case: bool = False) -> type[asyncio.Protocol] | str:
    """The HTTP protocol for a listener: riprap's, or uvicorn's stock one (`"httptools"`)
    when the self-check failed."""
    if not _PROTOCOL_OK:
        return "httptools"
    return type("RiprapHttpTools", (RiprapHttpTools,),
                {"hooks": hooks, "head_timeout": head_timeout, "keep_case": keep_case})


def active_fast_paths() -> dict[str, bool]:
    """Which uses of uvicorn's internals are active (False: uvicorn's stock protocol)."""
    return {"uvicorn.protocol": _PROTOCOL_OK}


def log_fast_paths(logger: Callable[..., None] = log.info) -> None:
    """One start-up line naming the fast paths, and a warning for a failed self-check."""
    if not _PROTOCOL_OK:
        log.warning("uvicorn's internals are not those riprap knows (%s): serving with "
                    "uvicorn's stock protocol, without riprap's request limits, faithful "
                    "targets and WebSocket relay", _PROTOCOL_WHY)
    paths = active_fast_paths()
    logger("client-side fast paths: %s",
           ", ".join(f"{k} {'on' if v else 'off'}" for k, v in paths.items()))


__all__ = ["HEADER_COUNT_LIMIT", "HEAD_LIMIT", "HEAD_TIMEOUT", "KEEP_ALIVE_TIMEOUT", "Hooks",
           "Relay", "RiprapHttpTools", "TARGET_KEY", "TUNNEL_KEY", "UPGRADE_KEY",
           "active_fast_paths", "log_fast_paths", "protocol_class", "refusal_bytes"]
