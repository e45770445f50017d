"""Every private name of httpx that riprap uses, in this one module, each behind a self-check.

httpx keeps a header as a `(name, lower-cased name, value)` triple of bytes in
`Headers._list`, a request body already in memory in `Request._content`, and a parsed URL
in `URL._uri_reference` (an `httpx._urlparse.ParseResult`). Reading and filling those
directly saves several microseconds per call on the hot path of both the engine and the
sidecar. Each fast path below is used only when a self-check at import shows that it
gives exactly what httpx's public API gives; otherwise the public way is used, so a new
httpx can make riprap slower, never wrong. `FAST_PATHS` says which are active (logged
once at start, shown at `/state`); `tests/policies/test_compat.py` asserts they all are
with the httpx versions pyproject allows.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import httpx

HeaderItems = list[tuple[bytes, bytes, bytes]]
RequestBuilder = Callable[[str, httpx.URL, HeaderItems, httpx.AsyncByteStream, "bytes | None",
                           dict[str, Any]], httpx.Request]

FAST_PATHS: dict[str, bool] = {}


# -- header items ------------------------------------------------------------------------


def _public_items(headers: httpx.Headers) -> HeaderItems:
    return [(k, k.lower(), v) for k, v in headers.raw]


def _choose_items() -> Callable[[httpx.Headers], HeaderItems]:
    try:
        sample = httpx.Headers([(b"Content-Type", b"a"), (b"X-Two", b"1"), (b"x-two", b"2"),
                                (b"X-Name", b"caf\xe9")])
        sample["X-Riprap-Attempts"] = "1"
        fast = operator.attrgetter("_list")
        if fast(sample) == _public_items(sample):
            return fast
    except Exception:  # noqa: BLE001 - any change in httpx's internals: the public way
        pass
    return _public_items


header_items: Callable[[httpx.Headers], HeaderItems] = _choose_items()
"""A `Headers` as `(name, lower-cased name, value)` byte triples, in order (no copy on the
fast path: the caller must not change the list)."""
FAST_PATHS["httpx.header_items"] = header_items is not _public_items


# -- set_header --------------------------------------------------------------------------


def _public_set(headers: httpx.Headers, name: bytes, value: str) -> None:
    headers[name.decode("ascii")] = value


def _fast_set(headers: httpx.Headers, name: bytes, value: str) -> None:
    items = headers._list
    for item in items:
        if item[1] == name:
            headers[name.decode("ascii")] = value
            return
    items.append((name, name, value.encode("ascii")))


def _choose_set() -> Callable[[httpx.Headers, bytes, str], None]:
    try:
        for start in ([], [(b"Content-Type", b"text/plain")], [(b"x-riprap-attempts", b"1")],
                      [(b"X-Riprap-Attempts", b"1"), (b"a", b"b"), (b"x-riprap-attempts", b"2")]):
            a, b = httpx.Headers(start), httpx.Headers(start)
            _fast_set(a, b"x-riprap-attempts", "3")
            _public_set(b, b"x-riprap-attempts", "3")
            if vars(a) != vars(b) or a.raw != b.raw or a != b:
                return _public_set
        return _fast_set
    except Exception:  # noqa: BLE001 - any change in httpx's internals: the public way
        return _public_set


set_header: Callable[[httpx.Headers, bytes, str], None] = _choose_set()
"""`headers[name] = value` for a lower-case ASCII `name` and an ASCII `value` (riprap's
own headers on an answer); `Headers.__setitem__` costs about 0.6 us, the fast way
appends the triple when the name is not there yet."""
FAST_PATHS["httpx.set_header"] = set_header is _fast_set


# -- build_request -----------------------------------------------------------------------


def _public_request(method: str, url: httpx.URL, items: HeaderItems,
                    stream: httpx.AsyncByteStream, content: bytes | None,
                    extensions: dict[str, Any]) -> httpx.Request:
    request = httpx.Request(method, url, headers=[(k, v) for k, _, v in items], stream=stream,
                            extensions=extensions)
    if content is not None:
        request.read()  # the body is in memory: marked as read, sent with its length
    return request


def _fast_request(method: str, url: httpx.URL, items: HeaderItems,
                  stream: httpx.AsyncByteStream, content: bytes | None,
                  extensions: dict[str, Any]) -> httpx.Request:
    headers = httpx.Headers.__new__(httpx.Headers)
    headers._list = items
    headers._encoding = None
    request = httpx.Request.__new__(httpx.Request)
    request.method = method.upper()  # as `Request.__init__` does
    request.url = url
    request.headers = headers
    request.extensions = extensions
    request.stream = stream
    if content is not None:
        request._content = content
    return request


def _same_request(a: httpx.Request, b: httpx.Request, content: bytes | None) -> bool:
    return (vars(a).keys() == vars(b).keys() and a.method == b.method and a.url == b.url
            and vars(a.headers) == vars(b.headers) and a.headers == b.headers
            and a.headers.raw == b.headers.raw
            and a.headers.get("X-Two") == b.headers.get("X-Two")
            and a.extensions == b.extensions and a.stream is b.stream
            and (content is None or a.content == b.content))


def _choose_request() -> RequestBuilder:
    try:
        url = httpx.URL("http://svc/a?b=1")
        for method, body in (("GET", b""), ("post", b"xy"), ("PUT", None)):
            items = [(b"Accept", b"accept", b"*/*"), (b"x-two", b"x-two", b"1"),
                     (b"X-Two", b"x-two", b"2"), (b"content-length", b"content-length", b"2")]
            stream = httpx.ByteStream(body if body is not None else b"z")
            a = _fast_request(method, url, list(items), stream, body, {"riprap.service": "svc"})
            b = _public_request(method, url, list(items), stream, body, {"riprap.service": "svc"})
            if not _same_request(a, b, body):
                return _public_request
        return _fast_request
    except Exception:  # noqa: BLE001 - any change in httpx's internals: the public way
        return _public_request


build_request: RequestBuilder = _choose_request()
"""An `httpx.Request` from header items already normalised (`Request(...)` normalises
every header again and joins an in-memory body: about 2 us per request)."""
FAST_PATHS["httpx.build_request"] = build_request is _fast_request


# -- exact URLs (make_url) ---------------------------------------------------------------
#
# `httpx.URL` normalises what it parses (it removes `.` and `..` segments, re-quotes, and
# its `raw_path` must be ASCII), and a forwarder must not: `/p/./y`, `/a/%2e%2e/b`, a bare
# `?` and raw non-ASCII bytes all go upstream exactly as they came (contract, section 9,
# "Faithful forwarding"). So the sidecar and the engine carry request targets in an
# `ExactURL`: its parsed form is filled directly (the target decoded as latin-1, one
# character per byte), never parsed, and its `raw_path` gives the exact bytes back (with
# `?query` whenever the client sent a `?`, even an empty one).


class ExactURL(httpx.URL):
    """An `httpx.URL` whose `raw_path` is the request target's exact bytes."""

    @property
    def raw_path(self) -> bytes:
        ref = self._uri_reference
        path: str = ref.path or "/"
        if ref.query is not None:
            path += "?" + ref.query
        return path.encode("latin-1")


def _public_exact(scheme: str, host: str, port: int | None, target: bytes) -> httpx.URL:
    if target == b"*":
        target = b"/*"  # what httpx can represent; the exact form needs the fast way
    return httpx.URL(scheme=scheme, host=host, port=port, raw_path=target)


def _choose_exact() -> Callable[[str, str, int | None, bytes], httpx.URL]:
    try:
        from httpx._urlparse import ParseResult

        def exact(scheme: str, host: str, port: int | None, target: bytes) -> httpx.URL:
            path, sep, query = target.partition(b"?")
            url = ExactURL.__new__(ExactURL)
            url._uri_reference = ParseResult(
                scheme, "", host, port, path.decode("latin-1"),
                query.decode("latin-1") if sep else None, None)
            return url

        samples: tuple[tuple[str, str, int | None, bytes], ...] = (
            ("http", "svc", None, b"/a/b%2Fc?x=1&y=%20"), ("http", "a.b-c", 8080, b"/"),
            ("https", "127.0.0.1", 9, b"/p?q"), ("http", "::1", 7, b"/x"))
        for args in samples:
            a, b = exact(*args), _public_exact(*args)
            if a != b or a.raw_path != args[3] or a.host != b.host or a.port != b.port \
                    or a.netloc != b.netloc or str(a) != str(b):
                return _public_exact
        odd = exact("http", "svc", None, b"/p/./y/../z?")
        if odd.raw_path != b"/p/./y/../z?" or odd.path != "/p/./y/../z":
            return _public_exact
        return exact
    except Exception:  # noqa: BLE001 - any change in httpx's internals: the public way
        return _public_exact


exact_url: Callable[[str, str, int | None, bytes], httpx.URL] = _choose_exact()
"""`SCHEME://HOST[:PORT]` + a request target, as an `httpx.URL` that keeps the target byte
for byte (the public way, after a failed self-check, normalises it: riprap then forwards
less faithfully, never to the wrong place)."""


def make_url(host: str, target: bytes) -> httpx.URL:
    """`http://HOST` + the raw target exactly as sent (the sidecar's incoming calls)."""
    return exact_url("http", host, None, target)


FAST_PATHS["httpx.make_url"] = exact_url is not _public_exact


def active_fast_paths() -> dict[str, bool]:
    """Which of httpx's fast paths are in use (False: the public way, after a self-check
    failed with this httpx)."""
    return dict(FAST_PATHS)


__all__ = ["FAST_PATHS", "ExactURL", "HeaderItems", "RequestBuilder", "active_fast_paths",
           "build_request", "exact_url", "header_items", "make_url", "set_header"]
