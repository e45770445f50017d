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
import logging
import ssl
import time
from typing import Any, AsyncIterator

import aiohttp
import httpx
from yarl import URL

from policies import aiohttp_compat, httpx_compat
from policies.headers import MAX_HEAD_BYTES, MAX_HEADERS, UpstreamHeadTooLarge, head_size
from policies.tls import TLS_EXTENSION, tls_reason

log = logging.getLogger("riprap.upstream")

# Hop-by-hop and framing headers aiohttp must decide itself (it chooses chunked or
# Content-Length from the body it is given; passing both makes it refuse the request).
_DROP_REQUEST_HEADERS = frozenset({b"transfer-encoding", b"connection", b"keep-alive"})
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
    `read_timeout` apply when the request carries no httpx timeout extension. A request's
    `riprap.tls` extension (`policies.tls.TlsClient`) says how an `https://` URL is called.
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
        log_fast_paths()
        fast = aiohttp_compat.FAST_PATHS
        # Without riprap's protocol a reused connection could hand a caller bytes nobody
        # asked for: then connections are not reused at all.
        reuse = bool(fast.get("aiohttp.response_protocol"))
        connector = aiohttp.TCPConnector(
            limit=self._limit,
            limit_per_host=self._limit_per_host,
            ttl_dns_cache=60,
            **({"keepalive_timeout": self._keepalive} if reuse else {"force_close": True}),
        )
        aiohttp_compat.install_protocol(connector)
        no_retry_switch = not fast.get("aiohttp.no_hidden_retries")
        session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            timeout=self._default_timeout,
            trust_env=False,
            # the answer-head bounds of section 9; over them: UpstreamHeadTooLarge
            max_line_size=MAX_HEAD_BYTES,
            max_field_size=MAX_HEAD_BYTES,
            max_headers=MAX_HEADERS,
            trace_configs=[aiohttp_compat.resend_guard()] if no_retry_switch else None,
        )
        aiohttp_compat.disable_hidden_retries(session)
        return session

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
        # Header bytes as the caller sent them: one character per byte (latin-1), which
        # aiohttp writes back as those same bytes (`raw_headers`) when not all are ASCII.
        headers: list[tuple[str, str]] = []
        url = request.url
        ascii_only = url.raw_path.isascii()  # a raw target is written byte for byte too
        for name, low, value in httpx_compat.header_items(request.headers):
            if low in _DROP_REQUEST_HEADERS:
                continue
            if ascii_only and not (value.isascii() and name.isascii()):
                ascii_only = False
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
        token = None
        if not ascii_only:
            token = aiohttp_compat.raw_headers()
            if token is None:
                raise httpx.LocalProtocolError(
                    f"aiohttp {aiohttp.__version__} cannot send non-ASCII header bytes (or target bytes) as "
                    "they are (riprap checked the aiohttp versions its pyproject allows)",
                    request=request)
        tls = request.extensions.get(TLS_EXTENSION)
        try:
            resp = await session.request(
                request.method,
                _yarl_url(url, latin1=token is not None),
                headers=headers,
                data=_request_body(request),
                allow_redirects=False,
                timeout=self._timeout_for(request),
                compress=None,
                ssl=tls.context if tls is not None else True,
                server_hostname=tls.server_hostname if tls is not None else None,
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if aiohttp_compat.is_head_too_large(exc):
                raise _head_too_large(request) from exc
            if _is_tls_error(exc):
                _warn(("tls", _origin(request), tls_reason(exc)), "TLS with %s failed: %s",
                      _origin(request), tls_reason(exc))
            mapped = map_aiohttp_error(exc, request, sent=_was_sent(exc))
            if mapped is None:  # pragma: no cover - every listed class maps
                raise
            raise mapped from exc
        except ValueError as exc:  # aiohttp refuses to write it (e.g. CR/LF in a header)
            raise httpx.LocalProtocolError(str(exc), request=request) from exc
        finally:
            if token is not None:
                aiohttp_compat.reset_raw_headers(token)
        raw = resp.raw_headers
        if head_size(len(resp.reason or "") + 13, raw) > MAX_HEAD_BYTES:
            resp.close()
            raise _head_too_large(request)
        return httpx.Response(
            status_code=resp.status,
            headers=list(raw),
            stream=AiohttpResponseStream(resp, request),
            extensions={
                "http_version": b"HTTP/1.1" if resp.version == (1, 1) else b"HTTP/1.0",
                "reason_phrase": (resp.reason or "").encode("latin-1", "replace"),
            },
        )

    def fast_paths(self) -> dict[str, bool]:
        """Which fast paths over httpx's and aiohttp's internals are in use (`/state`)."""
        return active_fast_paths()

    async def aclose(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session and not session.closed:
            await session.close()


def _origin(request: httpx.Request) -> str:
    url = request.url
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"


def _head_too_large(request: httpx.Request) -> UpstreamHeadTooLarge:
    _warn(("head", _origin(request)), "%s answered with a head over %d KiB or %d headers: "
          "502 upstream-failed, not retried", _origin(request), MAX_HEAD_BYTES // 1024,
          MAX_HEADERS)
    return UpstreamHeadTooLarge(
        f"the answer's head is over {MAX_HEAD_BYTES // 1024} KiB or {MAX_HEADERS} headers",
        request=request)


def _is_tls_error(exc: BaseException) -> bool:
    if isinstance(exc, (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError)):
        return True
    cur: BaseException | None = exc
    for _ in range(6):
        if cur is None:
            return False
        if isinstance(cur, ssl.SSLError):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


_WARNED: dict[tuple[str, ...], float] = {}
_WARN_EVERY = 10.0  # seconds between two log lines about the same upstream and cause


def _warn(key: tuple[str, ...], msg: str, *args: Any) -> None:
    """A warning about an upstream, at most once per `_WARN_EVERY` for the same key (a
    broken certificate must not write one line per call)."""
    now = time.monotonic()
    last = _WARNED.get(key)
    if last is not None and now - last < _WARN_EVERY:
        return
    if len(_WARNED) >= 256:
        _WARNED.clear()
    _WARNED[key] = now
    log.warning(msg, *args)


_logged_fast_paths = False


def log_fast_paths() -> None:
    """Log once per process which fast paths over httpx's and aiohttp's internals are on."""
    global _logged_fast_paths
    if _logged_fast_paths:
        return
    _logged_fast_paths = True
    paths = active_fast_paths()
    off = [name for name, on in paths.items() if not on]
    log.info("library fast paths (httpx %s, aiohttp %s): %s", httpx.__version__,
             aiohttp.__version__, ", ".join(f"{k} {'on' if v else 'OFF'}" for k, v in paths.items()))
    if off:
        log.warning("fast paths off with these library versions (slower or stricter, never "
                    "wrong): %s", ", ".join(off))


def active_fast_paths() -> dict[str, bool]:
    """Every fast path over a library's internals and whether it is in use (for `/state`)."""
    return {**httpx_compat.active_fast_paths(), **aiohttp_compat.active_fast_paths()}


def _yarl_url(url: httpx.URL, *, latin1: bool) -> URL:
    """The `yarl.URL` aiohttp sends, whose request target (`raw_path_qs`) is `url.raw_path`
    byte for byte: never normalised, a bare `?` kept, `*` kept (`OPTIONS *`).

    aiohttp writes the request line as UTF-8, or one byte per character when the head goes
    out as raw bytes (`latin1`, which a non-ASCII target always asks for). Cached on the
    URL object: the engine keeps one URL per endpoint and target."""
    key = "_riprap_yarl_l1" if latin1 else "_riprap_yarl"
    cached: URL | None = url.__dict__.get(key)
    if cached is None:
        target = url.raw_path.decode("latin-1" if latin1 else "ascii")
        cached = URL.build(scheme=url.scheme, authority=url.netloc.decode("ascii"),
                           path=target, encoded=True)
        url.__dict__[key] = cached
    return cached


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


__all__ = ["AiohttpResponseStream", "AiohttpTransport", "active_fast_paths", "log_fast_paths",
           "map_aiohttp_error"]
