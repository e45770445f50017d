"""Which headers pass where: the caller's headers forwarded upstream (minus hop-by-hop and
per-attempt ones), an incoming `x-riprap-deadline-ms`, the response headers the stale
cache does not replay, and the bounds of an upstream's answer head.

Header names and values stay bytes all the way: they reach the upstream as the caller
sent them (never decoded and encoded again)."""

from __future__ import annotations

from typing import Iterable

import httpx

from policies.errors import ATTEMPTS_HEADER, DEADLINE_HEADER, FALLBACK_HEADER, REASON_HEADER
from policies.httpx_compat import header_items, set_header

# The bounds of a message head (section 9 "Limits"): the request line or status line and
# the headers, in bytes, and the number of headers.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 256

# Hop-by-hop headers (RFC 9110 7.6.1, plus the proxy-only ones), never passed on in
# either direction, nor any header a `Connection` header names (`connection_named`). The
# one definition: the engine, the sidecar's proxy and the stale cache all use it. Also
# never forwarded as they are: the request headers riprap sets per attempt (Host,
# framing, the remaining deadline).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
DEADLINE_BYTES = DEADLINE_HEADER.encode()
PER_ATTEMPT = frozenset({b"host", b"content-length", DEADLINE_BYTES})
# Response headers not replayed from the stale cache: hop-by-hop ones, framing (it is
# recomputed) and riprap's own.
NOT_CACHED = frozenset({h.decode("ascii") for h in HOP_BY_HOP} | {
    "content-length", REASON_HEADER, ATTEMPTS_HEADER, FALLBACK_HEADER})


def connection_named(value: bytes, named: set[bytes] | None = None) -> set[bytes]:
    """The header names a `Connection` header's `value` lists (lower-cased), added to
    `named` (a message may carry several `Connection` headers)."""
    if named is None:
        named = set()
    named.update(t.strip().lower() for t in value.split(b","))
    return named


def forward_headers(raw: Iterable[tuple[bytes, bytes]]
                    ) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """The caller's headers minus hop-by-hop and per-attempt ones (and those `Connection`
    names), and the value of an incoming `x-riprap-deadline-ms` (found on the same pass)."""
    out: list[tuple[bytes, bytes]] = []
    extra: set[bytes] | None = None
    deadline: bytes | None = None
    for name, value in raw:
        low = name.lower()
        if low in HOP_BY_HOP:
            if low == b"connection":
                extra = connection_named(value, extra)
            continue
        if low in PER_ATTEMPT:
            if low == DEADLINE_BYTES:
                deadline = value
            continue
        out.append((name, value))
    if extra:
        out = [(n, v) for n, v in out if n.lower() not in extra]
    return out, deadline


def forward_items(headers: httpx.Headers, wanted: frozenset[bytes] = frozenset()
                  ) -> tuple[list[tuple[bytes, bytes, bytes]], bytes | None,
                             dict[bytes, list[bytes]]]:
    """`forward_headers` on an `httpx.Headers`, as httpx's own `(name, lower-cased name,
    value)` items (so each attempt's `Headers` is built without normalizing them again),
    the incoming `x-riprap-deadline-ms`, and the values of the `wanted` (lower-case)
    headers, all on one pass (see `header_value`)."""
    items = header_items(headers)
    out: list[tuple[bytes, bytes, bytes]] = []
    extra: set[bytes] | None = None
    deadline: bytes | None = None
    found: dict[bytes, list[bytes]] = {}
    for item in items:
        low = item[1]
        if wanted and low in wanted:  # any header, forwarded or not
            values = found.get(low)
            if values is None:
                found[low] = [item[2]]
            else:
                values.append(item[2])
        if low in HOP_BY_HOP:
            if low == b"connection":
                extra = connection_named(item[2], extra)
            continue
        if low in PER_ATTEMPT:
            if low == DEADLINE_BYTES:
                deadline = item[2]
            continue
        out.append(item)
    if extra:
        out = [item for item in out if item[1] not in extra]
    return out, deadline, found


def lower_ascii(name: str) -> bytes | None:
    """A header name as `forward_items` wants it (lower-cased bytes); None if not ASCII."""
    try:
        return name.lower().encode("ascii")
    except UnicodeEncodeError:
        return None


def header_value(values: list[bytes] | None, headers: httpx.Headers, name: str) -> str | None:
    """`headers.get(name)` from the values `forward_items` found for it: None when absent,
    the values joined with ", " (as httpx joins them); non-ASCII ones the public way
    (httpx picks the decoding from all the headers)."""
    if values is None:
        return None
    if len(values) == 1:
        v = values[0]
        if v.isascii():
            return v.decode("ascii")
    elif all(v.isascii() for v in values):
        return ", ".join(v.decode("ascii") for v in values)
    found: str | None = headers.get(name)
    return found




class UpstreamHeadTooLarge(httpx.RemoteProtocolError):
    """The upstream's answer head is over `MAX_HEAD_BYTES` or `MAX_HEADERS`: a 502 that is
    not retried (the same upstream would answer the same) and not held against the
    endpoint (it answered; see docs/engine.md)."""


def head_size(status_line_len: int, raw: Iterable[tuple[bytes, bytes]]) -> int:
    """The bytes of a head as sent: the status line, each `Name: value` line, CRLFs."""
    size = status_line_len + 4
    for k, v in raw:
        size += len(k) + len(v) + 4
    return size


def parse_deadline_header(value: str | None, now: float) -> float | None:
    """An incoming `x-riprap-deadline-ms` as an absolute clock time (None if absent or bad)."""
    if value is None:
        return None
    try:
        ms = float(value.strip())
    except ValueError:
        return None
    if ms != ms or ms < 0 or ms == float("inf"):
        return None
    return now + ms / 1000.0


__all__ = ["DEADLINE_BYTES", "HOP_BY_HOP", "connection_named", "MAX_HEADERS", "MAX_HEAD_BYTES", "NOT_CACHED",
           "PER_ATTEMPT", "UpstreamHeadTooLarge", "forward_headers", "forward_items",
           "head_size", "header_value", "lower_ascii", "parse_deadline_header", "set_header"]
