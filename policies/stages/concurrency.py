"""`concurrency`: hold a bulkhead slot until the answer's body is closed."""

from __future__ import annotations

import httpx

from policies.context import CallContext, Handler
from policies.errors import Overloaded
from policies.stage import StageParts
from policies.streams import on_close


def build(parts: StageParts, inner: Handler) -> Handler | None:
    """Wait (bounded by the bulkhead's queue) for a slot; refuse with 503 when none comes."""
    bulkhead = parts.bulkhead
    if bulkhead is None:
        return None
    obs = parts.env.observer
    name = parts.service

    async def concurrency(ctx: CallContext) -> httpx.Response:
        if not await bulkhead.acquire():
            obs.rejected(name, "concurrency")
            raise Overloaded(f"service '{name}' has no free concurrency slot")
        try:
            resp = await inner(ctx)
        except BaseException:
            bulkhead.release()
            raise
        on_close(resp, bulkhead.release)
        return resp

    return concurrency
