"""An httpx transport on aiohttp's connection pool: httpx's model, aiohttp's speed.

httpx's own pool (httpcore) costs about 2 ms of CPU per request at 32 concurrent calls
(encode/httpx#3215), which caps a forwarder near 500 requests/s. aiohttp's pool is several
times cheaper. So riprap keeps `httpx.Request`/`httpx.Response` as its model (the engine and
in-process users speak httpx) and sends them over one shared `aiohttp.ClientSession`.

What the session is set up to do, and why:
- one session per transport, created lazily inside the running loop (aiohttp binds a
  session to the loop it was created in);
- a sized pool with keep-alive; no cookie jar (a forwarder must not keep cookies between
  callers); `auto_decompress=False` (bytes pass through as the upstream sent them);
  no `Accept`/`Accept-Encoding`/`User-Agent`/`Content-Type` added by aiohttp (the caller's
  headers are forwarded as they are);
- no redirects followed (a proxy passes 3xx on).

Bodies stream both ways: the request body is read from the httpx stream as aiohttp sends
it, and the response body is an `httpx.AsyncByteStream` over `content.iter_any()` that
gives the connection back to the pool (or closes it, when unread) on `aclose()`.

aiohttp's errors become httpx's, in one place (`map_aiohttp_error`), so the engine only
knows httpx's exception tree.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, AsyncIterator, Iterable

import aiohttp
import httpx
from aiohttp.client_proto import ResponseHandler as _ResponseHandler
from yarl import URL

# Hop-by-hop and framing headers aiohttp must decide itself (it chooses chunked or
# Content-Length from the body it is given; passing both makes it refuse the request).
_DROP_REQUEST_HEADERS = frozenset({"transfer-encoding", "connection", "keep-alive"})
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


def map_aiohttp_error(exc: BaseException, request: httpx.Request, *,
                      sent: bool) -> httpx.TransportError | None:
    """The httpx exception for an aiohttp/OS error, or None when it is not a transport error.

    `sent` tells whether the request may have reached the upstream: before that, an OS error
    is a connect failure (safe to retry anything); after it, a read error (a reset).
    """
    msg = str(exc) or exc.__class__.__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(msg, request=request)
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return httpx.ReadTimeout(msg, request=request)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        if sent:
            return httpx.ReadTimeout(msg, request=request)
        return httpx.ConnectTimeout(msg, request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(msg, request=request)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError(msg, request=request)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(msg, request=request)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(msg, request=request)
    if isinstance(exc, aiohttp.ClientResponseError):
        # A malformed status line or headers: the upstream broke the protocol.
        return httpx.RemoteProtocolError(msg, request=request)
    if isinstance(exc, (aiohttp.ClientOSError, aiohttp.ClientConnectionError, OSError)):
        if sent:
            return httpx.ReadError(msg, request=request)
        return httpx.ConnectError(msg, request=request)
    if isinstance(exc, aiohttp.ClientError):
        return httpx.ReadError(msg, request=request)
    return None


class _SalvagingParser:
    """Wraps aiohttp's response parser to survive one common upstream bug: a body sent
    after a 204, a 304 or a HEAD answer (Python's `http.server` handlers often write one).

    RFC 9110 says such an answer has no body, so aiohttp parses the head, then tries to
    read the stray bytes as the next response and fails the whole read, losing the answer
    it had just parsed. httpx's own pool keeps the answer and drops the connection; this
    does the same: on a parse failure, if the bytes so far hold a complete head of an
    answer that cannot have a body, that head alone is parsed again with a fresh parser,
    the stray bytes are dropped and the connection is marked to close. Anything else
    fails as before.
    """

    _KEEP = 256 * 1024  # bytes kept for a salvage: enough for any head aiohttp accepts

    def __init__(self, handler: Any, params: dict[str, Any]) -> None:
        self._handler = handler
        self._params = params
        self._parser = handler._parser
        self._seen: bytes | None = b""  # bytes fed before the first message (then None)

    def feed_data(self, data: bytes) -> Any:
        seen = self._seen
        try:
            result = self._parser.feed_data(data)
        except Exception:
            salvaged = self._salvage(data if seen is None else seen + data)
            if salvaged is None:
                raise
            return salvaged
        if seen is not None:
            self._seen = None if result[0] else (seen + data)[-self._KEEP:]
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
            _ResponseHandler.set_response_params(handler, **self._params)  # a fresh parser
            fresh = handler._parser
            handler._parser = self
            messages, upgraded, tail = fresh.feed_data(raw[:end + 4])
        except Exception:  # noqa: BLE001 - the head itself is broken: the original error stands
            return None
        if len(messages) != 1:
            return None
        self._parser = fresh
        self._seen = None
        handler._should_close = True  # the stray bytes poisoned the connection
        return messages, upgraded, b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


class _LenientResponseHandler(_ResponseHandler):  # type: ignore[misc, valid-type]
    """aiohttp's connection protocol with `_SalvagingParser` around each response parser."""

    def set_response_params(self, **params: Any) -> None:
        super().set_response_params(**params)
        if self._parser is not None and not isinstance(self._parser, _SalvagingParser):
            self._parser = _SalvagingParser(self, params)


def _make_lenient(connector: aiohttp.TCPConnector) -> None:
    """Use `_LenientResponseHandler` for the connector's connections, where aiohttp's
    internals are as expected (otherwise keep aiohttp's own, strict behaviour)."""
    factory = getattr(connector, "_factory", None)
    if (isinstance(factory, functools.partial) and factory.func is _ResponseHandler
            and hasattr(_ResponseHandler, "set_response_params")):
        connector._factory = functools.partial(_LenientResponseHandler, *factory.args,  # type: ignore[attr-defined]
                                               **factory.keywords)


class AiohttpResponseStream(httpx.AsyncByteStream):
    """The upstream's body, chunk by chunk as it arrives; releases the connection on close."""

    __slots__ = ("_resp", "_request", "_closed")

    def __init__(self, resp: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._resp = resp
        self._request = request
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._resp.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                yield chunk
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            mapped = map_aiohttp_error(exc, self._request, sent=True)
            if mapped is None:  # pragma: no cover - every listed class maps
                raise
            self._resp.close()
            raise mapped from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        resp = self._resp
        if resp.content.at_eof():
            resp.release()  # fully read: the connection goes back to the pool
        else:
            resp.close()  # unread bytes would poison a reused connection: drop it


class AiohttpTransport(httpx.AsyncBaseTransport):
    """`httpx.AsyncBaseTransport` over one lazily created `aiohttp.ClientSession`.

    `limit` caps connections in the pool (0 = no cap), `limit_per_host` per upstream,
    `keepalive` is how long an idle connection is kept (seconds). `connect_timeout` and
    `read_timeout` apply when the request carries no httpx timeout extension.
    """

    def __init__(self, *, limit: int = 512, limit_per_host: int = 0,
                 keepalive: float = 30.0, connect_timeout: float | None = 5.0,
                 read_timeout: float | None = None,
                 session: aiohttp.ClientSession | None = None) -> None:
        self._limit = limit
        self._limit_per_host = limit_per_host
        self._keepalive = keepalive
        self._default_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self._session = session
        self._owns_session = session is None
        self._closed = False
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    def _new_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._limit,
            limit_per_host=self._limit_per_host,
            keepalive_timeout=self._keepalive,
            ttl_dns_cache=60,
        )
        _make_lenient(connector)
        return aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            timeout=self._default_timeout,
            trust_env=False,
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared session, created on first use (inside the running loop)."""
        if self._closed:
            raise RuntimeError("the transport is closed")
        session = self._session
        if session is None or (self._owns_session and session.closed):
            session = self._session = self._new_session()
        return session

    def _timeout_for(self, request: httpx.Request) -> aiohttp.ClientTimeout:
        """httpx's per-request timeout extension as an aiohttp timeout (cached by value)."""
        ext = request.extensions.get("timeout")
        if not ext:
            return self._default_timeout
        key = (ext.get("connect"), ext.get("read"), ext.get("write"), ext.get("pool"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            connect, read, _write, pool = key
            timeout = aiohttp.ClientTimeout(
                total=None,
                # aiohttp's `connect` covers the wait for a pool slot plus connecting.
                connect=(pool + connect) if pool is not None and connect is not None else None,
                sock_connect=connect,
                sock_read=read,
            )
            if len(self._timeouts) < 64:
                self._timeouts[key] = timeout
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self.session
        headers = [(k, v) for k, v in request.headers.multi_items()
                   if k.lower() not in _DROP_REQUEST_HEADERS]
        data = _request_body(request)
        try:
            resp = await session.request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=self._timeout_for(request),
                compress=None,
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            mapped = map_aiohttp_error(exc, request, sent=_was_sent(exc))
            if mapped is None:  # pragma: no cover - every listed class maps
                raise
            raise mapped from exc
        except ValueError as exc:  # aiohttp refuses to write it (e.g. CR/LF in a header)
            raise httpx.LocalProtocolError(str(exc), request=request) from exc
        return httpx.Response(
            status_code=resp.status,
            headers=_raw_headers(resp.raw_headers),
            stream=AiohttpResponseStream(resp, request),
            extensions={
                "http_version": b"HTTP/1.1" if resp.version == (1, 1) else b"HTTP/1.0",
                "reason_phrase": (resp.reason or "").encode("latin-1", "replace"),
            },
        )

    async def aclose(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session and not session.closed:
            await session.close()


def _was_sent(exc: BaseException) -> bool:
    """Whether the error happened after the request could have reached the upstream."""
    return not isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))


def _request_body(request: httpx.Request) -> bytes | AsyncIterator[bytes] | None:
    """The request's bytes when already read, else its stream (sent as it is produced)."""
    try:
        content = request.content  # raises RequestNotRead for an unread stream
    except httpx.RequestNotRead:
        return _aiter_stream(request.stream)
    return content or None


async def _aiter_stream(stream: httpx.AsyncByteStream | object) -> AsyncIterator[bytes]:
    if isinstance(stream, httpx.AsyncByteStream):
        async for chunk in stream:
            if chunk:
                yield chunk
    else:  # a sync stream handed to an async transport
        for chunk in stream:  # type: ignore[attr-defined]
            if chunk:
                yield chunk


def _raw_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return list(raw)


__all__ = ["AiohttpResponseStream", "AiohttpTransport", "map_aiohttp_error"]
