"""Which headers pass where: the caller's headers forwarded upstream (minus hop-by-hop and
per-attempt ones), an incoming `x-riprap-deadline-ms`, and the response headers the stale
cache does not replay."""

from __future__ import annotations

from typing import Iterable

import httpx

from policies.errors import ATTEMPTS_HEADER, DEADLINE_HEADER, FALLBACK_HEADER, REASON_HEADER

# Request headers never forwarded as they are: hop-by-hop ones (RFC 9110 7.6.1), and the
# ones riprap sets per attempt (Host, framing, the remaining deadline).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
DEADLINE_BYTES = DEADLINE_HEADER.encode()
PER_ATTEMPT = frozenset({b"host", b"content-length", DEADLINE_BYTES})
# Response headers not replayed from the stale cache (framing is recomputed).
NOT_CACHED = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length",
                        "trailer", "upgrade", REASON_HEADER, ATTEMPTS_HEADER,
                        FALLBACK_HEADER})


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
                extra = extra or set()
                extra.update(v.strip().lower() for v in value.split(b","))
            continue
        if low in PER_ATTEMPT:
            if low == DEADLINE_BYTES:
                deadline = value
            continue
        out.append((name, value))
    if extra:
        out = [(n, v) for n, v in out if n.lower() not in extra]
    return out, deadline


def forward_items(headers: httpx.Headers
                  ) -> tuple[list[tuple[bytes, bytes, bytes]], bytes | None]:
    """`forward_headers` on an `httpx.Headers`, as httpx's own `(name, lower-cased name,
    value)` items (so each attempt's `Headers` is built without normalizing them again),
    and the incoming `x-riprap-deadline-ms` found on the same pass."""
    items = getattr(headers, "_list", None)
    if items is None:  # not httpx's internals as known: the public way
        items = [(k, k.lower(), v) for k, v in headers.raw]
    out: list[tuple[bytes, bytes, bytes]] = []
    extra: set[bytes] | None = None
    deadline: bytes | None = None
    for item in items:
        low = item[1]
        if low in HOP_BY_HOP:
            if low == b"connection":
                extra = extra or set()
                extra.update(v.strip().lower() for v in item[2].split(b","))
            continue
        if low in PER_ATTEMPT:
            if low == DEADLINE_BYTES:
                deadline = item[2]
            continue
        out.append(item)
    if extra:
        out = [item for item in out if item[1] not in extra]
    return out, deadline


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


__all__ = ["DEADLINE_BYTES", "HOP_BY_HOP", "NOT_CACHED", "PER_ATTEMPT", "forward_headers",
           "forward_items", "parse_deadline_header"]
