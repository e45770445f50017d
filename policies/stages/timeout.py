"""`timeout`: bound everything inside by the call's deadline."""

from __future__ import annotations

import httpx

from policies.context import CallContext, Handler
from policies.errors import DeadlineExceeded
from policies.stage import StageParts
from policies.timers import deadline_scope, fmt_s


def build(parts: StageParts, inner: Handler) -> Handler | None:
    """The service's timeout, capped by an incoming deadline (`ctx.incoming_deadline`:
    the caller's `x-riprap-deadline-ms`, or a fallback's parent call). Always on."""
    timeout = parts.spec.timeout
    clock = parts.env.clock
    name = parts.service

    async def deadline(ctx: CallContext) -> httpx.Response:
        now = clock.now()
        end = now + timeout
        incoming = ctx.incoming_deadline
        if incoming is not None and incoming < end:
            end = incoming
            ctx.caller_bound = True
        else:
            ctx.caller_bound = False
        ctx.deadline = end
        ctx.expired = False
        left = end - now
        if left <= 0:
            raise DeadlineExceeded(f"no time left for service '{name}'")
        # `async with deadline_scope(...)`, unrolled (no __aenter__/__aexit__ coroutines)
        scope = deadline_scope(clock, left, ctx)
        scope.enter()
        try:
            resp = await inner(ctx)
        except BaseException as exc:
            try:
                scope.leave(exc)
            except TimeoutError:
                exc = TimeoutError()
            if isinstance(exc, TimeoutError):
                # failure="timeout": a retry stage placed outside the timeout retries it
                raise DeadlineExceeded(
                    f"service '{name}' did not answer within {fmt_s(left)}",
                    failure="timeout") from None
            raise
        scope.leave(None)
        return resp

    return deadline
