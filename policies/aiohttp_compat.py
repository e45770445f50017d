"""Every private name of aiohttp that riprap uses, in this one module, each behind a self-check.

aiohttp does four things by itself that a faithful forwarder must not do, and it offers no
public switch for them. Each is changed here, and only after a self-check against the
aiohttp that is installed; `FAST_PATHS` says which are active (logged once when the first
session is made, shown at `/state`), and `tests/policies/test_compat.py` asserts that all
are with the aiohttp versions pyproject allows. When a check fails, riprap falls back to
something slower that is still right (or refuses clearly), never to a wrong answer:

- `aiohttp.response_protocol`: connections use `RipRapProtocol`, aiohttp's
  `ResponseHandler` (installed through `TCPConnector._factory`) with two changes.
  It closes a pooled connection on which bytes arrive while no request is outstanding,
  instead of handing them to the next caller as its answer (aio-libs/aiohttp#13656). And
  its parser survives a body sent after a 204, a 304 or a HEAD answer: the answer is kept,
  the stray bytes dropped, the connection closed (as httpx's own pool does).
  Fallback: no connection reuse at all (`force_close`), so no stray byte can reach
  another call; the bodiless-answer salvage is lost (such an answer fails as a reset).
- `aiohttp.no_hidden_retries`: `ClientSession._retry_connection = False`. aiohttp resends
  an idempotent request by itself when a connection closes without an answer, behind the
  plan's back (its retry budget, its breaker, `x-riprap-attempts`). Fallback: a
  `TraceConfig` that stops any second send of one request before its first byte.
- `aiohttp.raw_header_bytes`: aiohttp encodes header strings as UTF-8, so a latin-1 byte
  (`caf\\xe9`) would reach the upstream as two. Requests whose headers are not all ASCII
  are serialized byte for byte instead (`http_writer._serialize_headers`, wrapped; other
  requests, and anyone else's aiohttp, are untouched). Fallback: such a request is refused
  (`raw_headers_unsupported`), a clear 502, never re-encoded bytes.
- `aiohttp.head_limit_errors`: which of aiohttp's parse errors mean "the answer head is over
  the bounds" (a too-long line, too many headers), so that they become a 502 that is not
  retried. Fallback: they count as a broken answer (a reset).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import re
from typing import Any, Callable

import aiohttp
from aiohttp import http_exceptions, http_writer
from aiohttp.client_proto import ResponseHandler
from multidict import CIMultiDict

from policies.headers import MAX_HEAD_BYTES, MAX_HEADERS

log = logging.getLogger("riprap.aiohttp")

FAST_PATHS: dict[str, bool] = {}

# -- the response protocol ---------------------------------------------------------------


def _through_final(messages: Any) -> list[Any]:
    """The messages up to and including the first final (not 1xx) answer."""
    kept = []
    for item in messages:
        kept.append(item)
        if item[0].code >= 200:
            break
    return kept


class _SalvagingParser:
    """Wraps aiohttp's response parser: notes when the final answer's head arrived (for
    `RipRapProtocol`'s idle check), and survives a body sent after a 204, a 304 or a HEAD
    answer.

    RFC 9110 says such an answer has no body, so aiohttp parses the head, then tries to
    read the stray bytes as the next response and fails the whole read, losing the answer
    it had just parsed. On a parse failure, if the bytes so far hold a complete head of an
    answer that cannot have a body, that head alone is parsed again with a fresh parser,
    the stray bytes are dropped and the connection is marked to close.
    """

    _KEEP = 256 * 1024  # bytes kept for a salvage: more than any head riprap accepts

    def __init__(self, handler: "RipRapProtocol", params: dict[str, Any]) -> None:
        self._handler = handler
        self._params = params
        self._parser: Any = handler._parser
        self._seen: bytes | None = b""  # bytes fed before the first message (then None)

    def feed_data(self, data: bytes) -> Any:
        seen = self._seen
        answered = self._handler._riprap_final is not None  # this request's answer head came
        try:
            result = self._parser.feed_data(data)
        except Exception:
            salvaged = self._salvage(data if seen is None else seen + data)
            if salvaged is None:
                raise
            return salvaged
        messages = result[0]
        if messages and (answered or len(messages) > 1):
            # riprap never pipelines: a message after the final answer (its body's last bytes
            # and the next head in one read) is an answer to nothing. Dropped, and the
            # connection is not reused.
            kept = [] if answered else _through_final(messages)
            if len(kept) < len(messages):
                self._handler._should_close = True
                messages = kept
                result = (kept, *result[1:])
        if seen is not None:
            self._seen = None if messages else (seen + data)[-self._KEEP:]
        if messages:
            self._handler._note_messages(messages)
        return result

    def _salvage(self, raw: bytes) -> Any:
        end = raw.find(b"\r\n\r\n")
        if end < 0 or not raw.startswith(b"HTTP/"):
            return None
        try:
            status = int(raw[9:12])
        except ValueError:
            return None
        if status not in (204, 304) and not self._params.get("skip_payload"):
            return None
        handler = self._handler
        try:
            ResponseHandler.set_response_params(handler, **self._params)  # a fresh parser
            fresh: Any = handler._parser
            handler._parser = self  # type: ignore[assignment]
            messages, upgraded, _tail = fresh.feed_data(raw[:end + 4])
        except Exception:  # noqa: BLE001 - the head itself is broken: the original error stands
            return None
        if len(messages) != 1:
            return None
        self._parser = fresh
        self._seen = None
        handler._should_close = True  # the stray bytes poisoned the connection
        handler._note_messages(messages)
        return messages, upgraded, b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


class RipRapProtocol(ResponseHandler):
    """aiohttp's connection protocol that never reads bytes nobody asked for.

    A request is outstanding from `set_response_params` (aiohttp calls it before sending)
    until its final answer (not a 1xx) arrived whole; after a 101 (an upgrade, such as a
    WebSocket) the connection is never idle again. Bytes that arrive outside that span
    are an answer to nothing: the connection is closed, so the pool never hands it out
    again (and a reused connection can never give a caller someone else's answer).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # whatever aiohttp's factory passes
        self._riprap_busy = False
        self._riprap_final: Any = None  # the final answer's payload, once its head arrived
        self._riprap_skip = False

    def set_response_params(self, **params: Any) -> None:
        self._riprap_busy = True
        self._riprap_final = None
        self._riprap_skip = bool(params.get("skip_payload"))
        super().set_response_params(**params)
        if self._parser is not None and not isinstance(self._parser, _SalvagingParser):
            self._parser = _SalvagingParser(self, params)  # type: ignore[assignment]

    def _note_messages(self, messages: Any) -> None:
        for message, payload in messages:
            code = message.code
            if code >= 200:  # a 1xx is not the answer (and a 101 hands the connection over)
                done = self._riprap_skip or code in (204, 304)
                self._riprap_final = aiohttp.streams.EMPTY_PAYLOAD if done else payload

    def data_received(self, data: bytes) -> None:
        if not self._riprap_busy:
            if data:
                log.debug("bytes on an idle upstream connection: closing it")
                self._should_close = True
                transport = self.transport
                if transport is not None:
                    transport.close()
            return
        super().data_received(data)
        final = self._riprap_final
        if final is not None and final.is_eof():
            self._riprap_busy = False


class _FakeTransport(asyncio.Transport):
    """What the self-check's protocol writes to and closes."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


_PARAMS: dict[str, Any] = {"read_until_eof": False, "auto_decompress": False, "read_timeout": None,
           "max_line_size": MAX_HEAD_BYTES, "max_field_size": MAX_HEAD_BYTES,
           "max_headers": MAX_HEADERS}


def _check_protocol(loop: asyncio.AbstractEventLoop) -> bool:
    """Does `RipRapProtocol` behave as it says, with this aiohttp?"""
    # an answer, then a stray answer on the idle connection: closed, the stray never queued
    p = RipRapProtocol(loop)
    t = _FakeTransport()
    p.connection_made(t)
    p.set_response_params(**_PARAMS)
    p.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    if len(p) != 1 or p._riprap_busy or t.closed:
        return False
    p.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
    if len(p) != 1 or not t.closed or not p.should_close:
        return False
    # a 100 Continue does not end the request; a 204 with a stray body is salvaged
    p = RipRapProtocol(loop)
    t = _FakeTransport()
    p.connection_made(t)
    p.set_response_params(**_PARAMS)
    p.data_received(b"HTTP/1.1 100 Continue\r\n\r\n")
    if not p._riprap_busy:
        return False
    p.data_received(b"HTTP/1.1 204 No Content\r\n\r\nstray body")
    return len(p) == 2 and not p._riprap_busy and p.should_close


def install_protocol(connector: aiohttp.TCPConnector) -> bool:
    """Make the connector's connections `RipRapProtocol`s; False (nothing changed) when
    aiohttp's internals are not as checked."""
    factory = getattr(connector, "_factory", None)
    if (FAST_PATHS.get("aiohttp.response_protocol") and isinstance(factory, functools.partial)
            and factory.func is ResponseHandler):
        connector._factory = functools.partial(  # type: ignore[assignment]
            RipRapProtocol, *factory.args, **factory.keywords)
        return True
    return False


# -- hidden retries ----------------------------------------------------------------------


class HiddenResend(aiohttp.ServerDisconnectedError):
    """aiohttp was about to send a request a second time by itself: stopped before a byte."""


def _check_retry_switch() -> bool:
    code = aiohttp.ClientSession._request.__code__
    return ("_retry_connection" in code.co_names
            and "_retry_connection" in getattr(aiohttp.ClientSession, "ATTRS", ()))


def disable_hidden_retries(session: aiohttp.ClientSession) -> bool:
    """Turn off aiohttp's own resend of idempotent requests; False when it cannot be done
    this way (then the session must carry `resend_guard()`)."""
    if FAST_PATHS.get("aiohttp.no_hidden_retries") and isinstance(
            getattr(session, "_retry_connection", None), bool):
        session._retry_connection = False
        return True
    return False


def resend_guard() -> aiohttp.TraceConfig:
    """The public fallback: a trace hook that stops a second send of one request."""
    async def on_headers_sent(_session: Any, ctx: Any, _params: Any) -> None:
        if getattr(ctx, "riprap_sent", False):
            raise HiddenResend("the upstream closed the connection without answering")
        ctx.riprap_sent = True

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(on_headers_sent)
    return trace


# -- header bytes as sent ----------------------------------------------------------------

_RAW_HEADERS: contextvars.ContextVar[bool] = contextvars.ContextVar("riprap_raw_headers",
                                                                     default=False)
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # as aiohttp refuses (header injection)


def _latin1_head(status_line: str, headers: Any) -> bytes:
    """A head whose strings each hold one byte per character (latin-1), written back as
    those bytes."""
    parts = [status_line, "\r\n"]
    for k, v in headers.items():
        if _FORBIDDEN.search(k) is not None or _FORBIDDEN.search(v) is not None:
            raise ValueError("Forbidden control character detected in headers. "
                             "Potential header injection attack.")
        parts += (k, ": ", v, "\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


_original_serialize: Any = None


def _serialize_headers(status_line: str, headers: Any) -> bytes:
    if _RAW_HEADERS.get():
        return _latin1_head(status_line, headers)
    return _original_serialize(status_line, headers)  # type: ignore[no-any-return]


def _install_serializer() -> bool:
    global _original_serialize
    write_headers = getattr(http_writer.StreamWriter, "write_headers", None)
    current = getattr(http_writer, "_serialize_headers", None)
    if write_headers is None or current is None or \
            "_serialize_headers" not in write_headers.__code__.co_names:
        return False
    if current is not _serialize_headers:
        _original_serialize = current
        http_writer._serialize_headers = _serialize_headers
    headers: CIMultiDict[str] = CIMultiDict([("X-Name", "caf\xe9"), ("X-U", "caf\xc3\xa9")])
    token = _RAW_HEADERS.set(True)
    try:
        raw = http_writer._serialize_headers("GET / HTTP/1.1", headers)
    finally:
        _RAW_HEADERS.reset(token)
    plain = http_writer._serialize_headers("GET / HTTP/1.1", CIMultiDict([("A", "b")]))
    return (raw == b"GET / HTTP/1.1\r\nX-Name: caf\xe9\r\nX-U: caf\xc3\xa9\r\n\r\n"
            and plain == b"GET / HTTP/1.1\r\nA: b\r\n\r\n")


def raw_headers() -> contextvars.Token[bool] | None:
    """Mark this task's next request as one whose header strings are latin-1 bytes (reset
    the token after sending); None when aiohttp cannot write them as they are."""
    if not FAST_PATHS.get("aiohttp.raw_header_bytes"):
        return None
    return _RAW_HEADERS.set(True)


def reset_raw_headers(token: contextvars.Token[bool]) -> None:
    _RAW_HEADERS.reset(token)


# -- the answer-head bounds --------------------------------------------------------------


_HEAD_LIMIT_WORDS = ("Too many headers", "Got more than")  # aiohttp's wording for both


def is_head_too_large(exc: BaseException) -> bool:
    """Whether an aiohttp error (or one in its cause chain) says the answer head was over
    the parser's bounds (a line over `max_line_size`/`max_field_size`, or too many headers).

    aiohttp passes the parser's error on as a copy that keeps only its message (a
    `ClientResponseError` from an `HttpProcessingError`), so the message is what tells."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, http_exceptions.LineTooLong):
            return True
        message = getattr(cur, "message", None)
        if isinstance(cur, (http_exceptions.HttpProcessingError, aiohttp.ClientResponseError)) \
                and isinstance(message, str) and message.startswith(_HEAD_LIMIT_WORDS):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


def _check_head_limits(loop: asyncio.AbstractEventLoop) -> bool:
    for head in (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(4)),
                 b"HTTP/1.1 200 OK\r\nSet-Cookie: " + b"a" * 200 + b"\r\n"):
        p = ResponseHandler(loop)
        p.connection_made(_FakeTransport())
        p.set_response_params(**{**_PARAMS, "max_headers": 2, "max_line_size": 100,
                                 "max_field_size": 100})
        p.data_received(head + b"\r\n")
        exc = p.exception()
        if exc is None or not is_head_too_large(exc):
            return False
    return True


# -- the self-checks ---------------------------------------------------------------------


def _self_check() -> None:
    loop = asyncio.new_event_loop()
    try:
        checks: tuple[tuple[str, Callable[[], bool]], ...] = (
                            ("aiohttp.response_protocol", lambda: _check_protocol(loop)),
                            ("aiohttp.no_hidden_retries", _check_retry_switch),
                            ("aiohttp.raw_header_bytes", _install_serializer),
                            ("aiohttp.head_limit_errors", lambda: _check_head_limits(loop)))
        for name, check in checks:
            try:
                FAST_PATHS[name] = bool(check())
            except Exception:  # noqa: BLE001 - any change in aiohttp's internals: off
                FAST_PATHS[name] = False
    finally:
        loop.close()


_self_check()


def active_fast_paths() -> dict[str, bool]:
    """Which of the changes above are in force with this aiohttp (False: its fallback)."""
    return dict(FAST_PATHS)


__all__ = ["FAST_PATHS", "HiddenResend", "RipRapProtocol", "active_fast_paths",
           "disable_hidden_retries", "install_protocol", "is_head_too_large", "raw_headers",
           "resend_guard", "reset_raw_headers"]
