"""`limit`: take a token from the rate limiter's bucket, or refuse the call (429)."""

from __future__ import annotations

import httpx

from policies.context import CallContext, Handler
from policies.errors import RateLimited
from policies.headers import lower_ascii
from policies.stage import AsyncLimiter, StageParts


def build(parts: StageParts, inner: Handler) -> Handler | None:
    """One bucket per service, or per value of the `per header` header. A limiter with an
    async `take` (`policies.stage.AsyncLimiter`, e.g. a shared store) is awaited."""
    limiter = parts.limiter
    if limiter is None:
        return None
    per_header = limiter.per_header
    lname = lower_ascii(per_header) if per_header else None
    obs = parts.env.observer
    name = parts.service

    def refuse(wait: float) -> RateLimited:
        obs.rejected(name, "limit")
        return RateLimited(f"rate limit of service '{name}' reached", retry_after=wait)

    if isinstance(limiter, AsyncLimiter):
        take = limiter.take

        async def limit_async(ctx: CallContext) -> httpx.Response:
            key = ctx.header(lname, per_header) if per_header else None
            wait = await take(key)
            if wait:
                raise refuse(wait)
            return await inner(ctx)

        return limit_async

    try_take = limiter.try_take

    async def limit(ctx: CallContext) -> httpx.Response:
        key = ctx.header(lname, per_header) if per_header else None  # = request.headers.get
        wait = try_take(key)
        if wait:
            raise refuse(wait)
        return await inner(ctx)

    return limit
