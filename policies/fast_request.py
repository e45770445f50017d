"""Building an `httpx.Request` from header items the caller already normalised.

`httpx.Request(...)` normalises every header again (`Headers.__init__`) and, for a body
already in memory, `read()` joins its stream: about 2 us per request, spent on the hot
path of both the engine (each attempt) and the sidecar (each incoming call), for headers
that already are httpx's own `(name, lower-cased name, value)` items.

`build_request` fills the same attributes directly. It is the fast way only when a
self-check at import shows that it builds exactly what the public constructor builds;
if httpx's internals ever change, the public constructor is used instead, so a new httpx
can make riprap slower but never wrong.
"""

from __future__ import annotations

from typing import Any, Callable

import httpx

HeaderItems = list[tuple[bytes, bytes, bytes]]
RequestBuilder = Callable[[str, httpx.URL, HeaderItems, httpx.AsyncByteStream, "bytes | None",
                           dict[str, Any]], httpx.Request]


def _public(method: str, url: httpx.URL, items: HeaderItems, stream: httpx.AsyncByteStream,
            content: bytes | None, extensions: dict[str, Any]) -> httpx.Request:
    request = httpx.Request(method, url, headers=[(k, v) for k, _, v in items], stream=stream,
                            extensions=extensions)
    if content is not None:
        request.read()  # the body is in memory: marked as read, sent with its length
    return request


def _fast(method: str, url: httpx.URL, items: HeaderItems, stream: httpx.AsyncByteStream,
          content: bytes | None, extensions: dict[str, Any]) -> httpx.Request:
    headers = httpx.Headers.__new__(httpx.Headers)
    headers._list = items  # type: ignore[attr-defined]
    headers._encoding = None  # type: ignore[attr-defined]
    request = httpx.Request.__new__(httpx.Request)
    request.method = method.upper()  # as `Request.__init__` does
    request.url = url
    request.headers = headers
    request.extensions = extensions
    request.stream = stream
    if content is not None:
        request._content = content  # type: ignore[attr-defined]
    return request


def _same(a: httpx.Request, b: httpx.Request, content: bytes | None) -> bool:
    return (vars(a).keys() == vars(b).keys() and a.method == b.method and a.url == b.url
            and vars(a.headers) == vars(b.headers) and a.headers == b.headers
            and a.headers.raw == b.headers.raw
            and a.headers.get("X-Two") == b.headers.get("X-Two")
            and a.extensions == b.extensions and a.stream is b.stream
            and (content is None or a.content == b.content))


def _choose() -> RequestBuilder:
    try:
        url = httpx.URL("http://svc/a?b=1")
        for method, body in (("GET", b""), ("post", b"xy"), ("PUT", None)):
            items = [(b"Accept", b"accept", b"*/*"), (b"x-two", b"x-two", b"1"),
                     (b"X-Two", b"x-two", b"2"), (b"content-length", b"content-length", b"2")]
            stream = httpx.ByteStream(body if body is not None else b"z")
            a = _fast(method, url, list(items), stream, body, {"riprap.service": "svc"})
            b = _public(method, url, list(items), stream, body, {"riprap.service": "svc"})
            if not _same(a, b, body):
                return _public
        return _fast
    except Exception:  # noqa: BLE001 - any change in httpx's internals: the public way
        return _public


build_request: RequestBuilder = _choose()

__all__ = ["HeaderItems", "build_request"]
