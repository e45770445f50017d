"""Which service a Host names: one rule for the engine (`ResilientTransport`, by URL host)
and the sidecar's router (by `Host` header or forward-proxy target).

A service is named by its name or one of its `host` aliases; case, port and a trailing
dot are ignored, and an IPv6 literal is the same with or without its brackets
(`[::1]:7400`, `[::1]` and `::1` all name `::1`).
"""

from __future__ import annotations

from typing import Iterable, Mapping

CACHE_SIZE = 1024  # remembered spellings (hits and misses), each at most CACHE_HOST_LEN long
CACHE_HOST_LEN = 256


def host_key(host: str) -> str:
    """`Example.COM:80` -> `example.com`; `[::1]:7400`, `[::1]` and `::1` -> `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


class HostTable:
    """Service by host, for one plan: immutable once built (rebuilt on reload)."""

    __slots__ = ("_by_key", "_seen")

    def __init__(self, services: Mapping[str, Iterable[str]]) -> None:
        """`services`: each service's name -> its `host` aliases. A name wins over another
        service's alias of the same spelling; the first alias wins among aliases."""
        by_key: dict[str, str] = {}
        for name in services:
            by_key.setdefault(host_key(name), name)
        for name, aliases in services.items():
            for alias in aliases:
                by_key.setdefault(host_key(alias), name)
        self._by_key: Mapping[str, str] = by_key
        # recent spellings as sent -> answer: the same few values arrive on every call
        self._seen: dict[str, str | None] = {}

    def service_for_host(self, host: str) -> str | None:
        seen = self._seen
        try:
            return seen[host]
        except KeyError:
            pass
        name = self._by_key.get(host_key(host))
        if len(host) <= CACHE_HOST_LEN:  # bounded: CACHE_SIZE spellings of bounded length
            if len(seen) >= CACHE_SIZE:
                seen.clear()
            seen[host] = name
        return name


__all__ = ["HostTable", "host_key"]
