"""Fallback answers: a bounded stale cache of good responses, and static answers.

`StaleCache` keeps the last good response per method + URL (+ the request headers its
`Vary` names), least recently used first out, bounded by entry count and by bytes (an
entry too large for `max_entry_bytes` is not kept, and drops an older entry for the same
key, which would no longer be the last good answer). `get` returns an entry only while
it is younger than `max_age`. Which responses are "good" is the caller's choice (riprap
stores 2xx answers), and `shared_cache_vary` says which ones a shared cache may store at
all (RFC 9111, section 9 "Stale answers"): one user's private answer is never replayed
to another.

`StaticAnswer` turns a `fallback status ...` spec into a status, headers and body once,
at build time, so answering costs nothing on the hot path.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import httpx

from dsl.plan import FallbackSpec

MiB = 1024 * 1024


def cache_key(method: str, url: str) -> str:
    """The cache key of a request: its method and full URL (query included)."""
    return f"{method.upper()} {url}"


def _directives(headers: httpx.Headers, name: str) -> set[str]:
    """The lower-cased directive names of a comma-separated header (`private="x"` is
    `private`)."""
    out: set[str] = set()
    for value in headers.get_list(name, split_commas=True):
        token = value.split("=", 1)[0].strip().lower()
        if token:
            out.add(token)
    return out


def shared_cache_vary(request: httpx.Headers, response: httpx.Headers) -> tuple[str, ...] | None:
    """May a shared cache store this answer to this request (RFC 9111 section 3)? None if
    not; else the request headers its `Vary` names (lower-cased, sorted), part of its key.

    Never stored: a request with `Cookie`, or with `Authorization` unless the answer says
    `Cache-Control: public`; an answer with `Set-Cookie`, `Cache-Control: private` or
    `no-store`, or `Vary: *`."""
    if "cookie" in request or "set-cookie" in response:
        return None
    control = _directives(response, "cache-control")
    if "no-store" in control or "private" in control:
        return None
    if "authorization" in request and "public" not in control:
        return None
    vary = _directives(response, "vary")
    if "*" in vary:
        return None
    return tuple(sorted(vary))


def variant_key(base: str, vary: tuple[str, ...], request: httpx.Headers) -> str:
    """The key of one variant: the base key plus the values of the `vary` request headers
    (absent and empty differ)."""
    if not vary:
        return base
    parts = [base]
    for name in vary:
        values = request.get_list(name)
        parts.append(f"{name}={', '.join(values)}" if values else f"{name}!")
    return "\n".join(parts)


@dataclass(frozen=True, slots=True)
class CachedResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    stored_at: float
    size: int

    def age(self, now: float) -> float:
        return max(0.0, now - self.stored_at)


def _entry_size(key: str, headers: list[tuple[str, str]], body: bytes) -> int:
    return len(body) + len(key) + sum(len(k) + len(v) for k, v in headers)


class StaleCache:
    __slots__ = ("max_entries", "max_bytes", "max_entry_bytes", "_entries", "_vary", "bytes",
                 "hits", "misses")

    def __init__(
        self,
        max_entries: int = 1024,
        max_bytes: int = 16 * MiB,
        max_entry_bytes: int = 1 * MiB,
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or max_entry_bytes < 1:
            raise ValueError("stale cache bounds must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self._entries: OrderedDict[str, CachedResponse] = OrderedDict()
        # base key -> the request headers its last stored answer varied on (bounded)
        self._vary: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def _drop(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size

    def put(
        self,
        key: str,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        now: float,
    ) -> bool:
        """Store a good response; False when it is too large to keep."""
        self._drop(key)
        size = _entry_size(key, headers, body)
        if size > self.max_entry_bytes:
            return False
        entries = self._entries
        while entries and (len(entries) >= self.max_entries or self.bytes + size > self.max_bytes):
            _, evicted = entries.popitem(last=False)
            self.bytes -= evicted.size
        entries[key] = CachedResponse(status, list(headers), bytes(body), now, size)
        self.bytes += size
        return True

    def get(self, key: str, max_age: float, now: float) -> CachedResponse | None:
        """The stored response if it is younger than `max_age` seconds, else None."""
        entry = self._entries.get(key)
        if entry is None or now - entry.stored_at >= max_age:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def store_key(self, base: str, vary: tuple[str, ...], request: httpx.Headers) -> str:
        """The key to `put` an answer under, remembering which request headers the
        answers for `base` vary on (so that `lookup` builds the same key)."""
        vary_of = self._vary
        if vary:
            vary_of[base] = vary
            vary_of.move_to_end(base)
            while len(vary_of) > self.max_entries:
                vary_of.popitem(last=False)
        else:
            vary_of.pop(base, None)
        return variant_key(base, vary, request)

    def lookup(self, base: str, request: httpx.Headers, max_age: float,
               now: float) -> CachedResponse | None:
        """`get` for a request: the variant its headers select, if young enough."""
        return self.get(variant_key(base, self._vary.get(base, ()), request), max_age, now)

    def snapshot(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "bytes": self.bytes,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
        }


@dataclass(frozen=True, slots=True)
class StaticAnswer:
    """A ready-made `fallback status CODE json|text|file` answer."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @classmethod
    def from_spec(cls, spec: FallbackSpec) -> StaticAnswer:
        """Build the answer; a `file` source is read now (relative paths were resolved
        by the compiler). A missing or unreadable file is a ValueError naming it."""
        if spec.kind != "static" or spec.status is None:
            raise ValueError(f"not a static fallback: {spec.kind} (status {spec.status})")
        if spec.body is not None:
            body = spec.body.encode("utf-8")
        elif spec.file is not None:
            try:
                body = Path(spec.file).read_bytes()
            except OSError as exc:
                raise ValueError(f"fallback file {spec.file!r} cannot be read: {exc.strerror or exc}") from None
        else:
            body = b""
        ctype = spec.content_type or _guess_type(spec)
        headers = (("content-type", ctype), ("content-length", str(len(body))))
        return cls(spec.status, headers, body)


def _guess_type(spec: FallbackSpec) -> str:
    if spec.file is not None and spec.file.endswith(".json"):
        return "application/json"
    if spec.file is not None and spec.file.endswith((".html", ".htm")):
        return "text/html; charset=utf-8"
    return "text/plain; charset=utf-8"
