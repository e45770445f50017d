"""riprap's policy engine: a plan in, resilient calls out.

In-process use::

    client = httpx.AsyncClient(transport=ResilientTransport(plan))

`ResilientTransport` and `AiohttpTransport` are loaded lazily (PEP 562), so importing a
primitive such as `policies.breaker` does not pull in aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from policies.errors import (
    BadRequest,
    BreakerOpen,
    DeadlineExceeded,
    NoHealthyEndpoint,
    Overloaded,
    RateLimited,
    ResilienceError,
    UnknownService,
    UpstreamFailed,
)

if TYPE_CHECKING:
    from policies.aiohttp_transport import AiohttpTransport
    from policies.transport import ResilientTransport

_LAZY = {
    "ResilientTransport": "policies.transport",
    "AiohttpTransport": "policies.aiohttp_transport",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'policies' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AiohttpTransport",
    "BadRequest",
    "BreakerOpen",
    "DeadlineExceeded",
    "NoHealthyEndpoint",
    "Overloaded",
    "RateLimited",
    "ResilienceError",
    "ResilientTransport",
    "UnknownService",
    "UpstreamFailed",
]
