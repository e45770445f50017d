"""`hedge`: send idempotent requests with a replayable body as several copies
(`policies.hedging`), the first good answer winning."""

from __future__ import annotations

import httpx

from dsl.plan import IDEMPOTENT_METHODS
from policies.context import CallContext, Handler, idempotent
from policies.hedging import HedgeRun
from policies.stage import StageParts


def build(parts: StageParts, inner: Handler) -> Handler | None:
    hedge = parts.hedge
    if hedge is None:
        return None
    methods = parts.spec.retry.methods if parts.spec.retry else IDEMPOTENT_METHODS

    async def hedged(ctx: CallContext) -> httpx.Response:
        if ctx.method not in methods and not idempotent(ctx, methods):
            return await inner(ctx)
        if ctx.body is None and ctx.stream is None:
            await ctx.prepare_body()
        if not ctx.replayable:
            return await inner(ctx)
        return await HedgeRun(parts, hedge, inner, ctx).run()

    return hedged
