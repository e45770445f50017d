"""A store URL without its password, for everything riprap shows: /plan, /state, logs, metrics.

The admin API has no authentication (contract section 9), so a `store redis://:PASSWORD@...`
must never appear there as written. Kept apart from `policies.store` so that showing a plan
does not import the Redis client.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact(url: str) -> str:
    """`redis://:PASSWORD@HOST:PORT/DB` -> `redis://:***@HOST:PORT/DB` (a URL without one as is)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<bad url>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username}:***@{host}" if parts.username else f":***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


__all__ = ["redact"]
