"""Sharding: which shard a key belongs to, and where the key is in a request.

Rendezvous (highest random weight) hashing: each shard scores the key with a stable
hash of (shard, key) and the highest score wins. blake2b (never Python's `hash()`,
which is salted per process) makes the mapping the same in every process; adding a
shard moves only the keys that the new shard now wins, about 1/n of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from hashlib import blake2b
from urllib.parse import parse_qsl

import httpx

from dsl.plan import ShardingSpec


def score(shard: str, key: str) -> int:
    """The stable 64-bit rendezvous weight of `key` on `shard`."""
    h = blake2b(shard.encode("utf-8", "surrogatepass"), digest_size=8)
    h.update(b"\x00")
    h.update(key.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest(), "big")


class Rendezvous:
    """HRW over a fixed list of shards, with each shard's hash prefix computed once."""

    __slots__ = ("names", "_prefixes")

    def __init__(self, shard_names: Sequence[str]) -> None:
        if not shard_names:
            raise ValueError("rendezvous hashing needs at least one shard")
        self.names = tuple(shard_names)
        self._prefixes = []
        for name in self.names:
            h = blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8)
            h.update(b"\x00")
            self._prefixes.append((name, h))

    def pick(self, key: str) -> str:
        data = key.encode("utf-8", "surrogatepass")
        best_name = ""
        best = -1
        for name, prefix in self._prefixes:
            h = prefix.copy()
            h.update(data)
            s = int.from_bytes(h.digest(), "big")
            # Ties (astronomically rare) go to the smaller name, independent of order.
            if s > best or (s == best and name < best_name):
                best, best_name = s, name
        return best_name


@lru_cache(maxsize=256)
def _rendezvous(names: tuple[str, ...]) -> Rendezvous:
    return Rendezvous(names)


def shard_for(key: str, shard_names: Sequence[str]) -> str:
    """The shard that owns `key` (same answer in every process, for the same names)."""
    return _rendezvous(tuple(shard_names)).pick(key)


def _header(headers: Mapping[str, str] | httpx.Headers, name: str) -> str | None:
    if isinstance(headers, httpx.Headers):
        found: str | None = headers.get(name)
        return found
    value = headers.get(name)
    if value is not None:
        return value
    lower = name.lower()
    for k, v in headers.items():
        if k.lower() == lower:
            return v
    return None


def _cookie(cookie_header: str, name: str) -> str | None:
    """The value of cookie `name` in a `Cookie` header (RFC 6265 `a=1; b=2`)."""
    for part in cookie_header.split(";"):
        k, sep, v = part.partition("=")
        if sep and k.strip() == name:
            v = v.strip()
            if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
                v = v[1:-1]
            return v
    return None


def extract_key(
    spec: ShardingSpec,
    path: str,
    query: str,
    headers: Mapping[str, str] | httpx.Headers,
) -> str | None:
    """The shard key of a request, or None when it has none (empty counts as none).

    header/cookie: by name (header names case-insensitive, cookie names exact);
    query: the first value of the parameter, percent-decoded; path-segment N: the N-th
    non-empty segment (1-based) of the path as sent upstream, as written (not decoded).
    """
    by = spec.by
    value: str | None
    if by == "header":
        value = _header(headers, spec.key)
    elif by == "query":
        value = None
        if query:
            if isinstance(query, bytes):
                query = query.decode("latin-1")
            for k, v in parse_qsl(query, keep_blank_values=True):
                if k == spec.key:
                    value = v
                    break
    elif by == "cookie":
        value = None
        if isinstance(headers, httpx.Headers):
            cookies = headers.get_list("cookie")
        else:
            c = _header(headers, "cookie")
            cookies = [c] if c is not None else []
        for c in cookies:
            value = _cookie(c, spec.key)
            if value is not None:
                break
    elif by == "path-segment":
        try:
            n = int(spec.key)
        except ValueError:
            raise ValueError(f"path-segment shard key must be a number, got {spec.key!r}") from None
        if n < 1:
            raise ValueError(f"path segments count from 1, got {n}")
        path = path.split("?", 1)[0]
        segments = [s for s in path.split("/") if s]
        value = segments[n - 1] if n <= len(segments) else None
    else:
        raise ValueError(f"unknown shard key kind {by!r}")
    return value or None
