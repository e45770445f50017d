"""`chaos`: inject the plan's faults (only when the transport runs with `chaos=True`)."""

from __future__ import annotations

import httpx

from policies.answers import chaos_abort_response
from policies.context import CallContext, Handler
from policies.stage import StageParts


def build(parts: StageParts, inner: Handler) -> Handler | None:
    """An abort answers at once with its status; a delay waits, then the call goes on."""
    chaos = parts.chaos
    if chaos is None:
        return None
    clock = parts.env.clock

    async def inject(ctx: CallContext) -> httpx.Response:
        action = chaos.decide()
        if action is None:
            return await inner(ctx)
        if action.delay > 0:
            await clock.sleep(action.delay)
        if action.kind == "abort":
            return chaos_abort_response(action.status or 503)
        return await inner(ctx)

    return inject
