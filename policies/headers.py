"""Which headers pass where: the caller's headers forwarded upstream (minus hop-by-hop and
per-attempt ones), an incoming `x-riprap-deadline-ms`, and the response headers the stale
cache does not replay."""

from __future__ import annotations

from typing import Callable, Iterable

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


def forward_items(headers: httpx.Headers, wanted: frozenset[bytes] = frozenset()
                  ) -> tuple[list[tuple[bytes, bytes, bytes]], bytes | None,
                             dict[bytes, list[bytes]]]:
    """`forward_headers` on an `httpx.Headers`, as httpx's own `(name, lower-cased name,
    value)` items (so each attempt's `Headers` is built without normalizing them again),
    the incoming `x-riprap-deadline-ms`, and the values of the `wanted` (lower-case)
    headers, all on one pass (see `header_value`)."""
    items = getattr(headers, "_list", None)
    if items is None:  # not httpx's internals as known: the public way
        items = [(k, k.lower(), v) for k, v in headers.raw]
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


def _set_header_factory() -> Callable[[httpx.Headers, bytes, str], None]:
    """`set_header(headers, name, value)`: `headers[name] = value` for a lower-case
    ASCII `name` and an ASCII `value` (riprap's own headers on an answer).

    `Headers.__setitem__` encodes, lower-cases and scans generically (about 0.6 us); the
    fast way appends httpx's own `(name, lower-cased name, value)` item when the name is
    not there yet, else uses the public way. It is used only when a self-check at
    import shows it leaves what the public way leaves."""
    def public(headers: httpx.Headers, name: bytes, value: str) -> None:
        headers[name.decode("ascii")] = value

    def fast(headers: httpx.Headers, name: bytes, value: str) -> None:
        items = headers._list  # type: ignore[attr-defined]
        for item in items:
            if item[1] == name:
                headers[name.decode("ascii")] = value
                return
        items.append((name, name, value.encode("ascii")))

    try:
        for start in ([], [(b"Content-Type", b"text/plain")], [(b"x-riprap-attempts", b"1")],
                      [(b"X-Riprap-Attempts", b"1"), (b"a", b"b"), (b"x-riprap-attempts", b"2")]):
            a, b = httpx.Headers(start), httpx.Headers(start)
            fast(a, b"x-riprap-attempts", "3")
            public(b, b"x-riprap-attempts", "3")
            if vars(a) != vars(b) or a.raw != b.raw or a != b:
                return public
        return fast
    except Exception:  # noqa: BLE001 - any httpx internals change: the public way
        return public


set_header = _set_header_factory()


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
           "forward_items", "header_value", "lower_ascii", "parse_deadline_header",
           "set_header"]
