"""`breaker`: refuse at once while the circuit breaker is open; otherwise record the outcome."""

from __future__ import annotations

import asyncio

import httpx

from policies.context import CallContext, Handler
from policies.errors import BreakerOpen, ResilienceError
from policies.stage import StageParts


def build(parts: StageParts, inner: Handler) -> Handler | None:
    """A failure is an attempt's failure (connect-failure, reset, timeout), a 5xx, or the
    service's deadline cutting the call; riprap's own refusals, a losing hedge, a caller
    that went away and a cut by the caller's own shorter deadline record no outcome."""
    breaker = parts.breaker
    if breaker is None:
        return None
    clock = parts.env.clock
    where = parts.where

    async def guarded(ctx: CallContext) -> httpx.Response:
        if not breaker.allow():
            raise BreakerOpen(f"the breaker of {where} is open", retry_in=breaker.retry_in())
        t0 = clock.now()
        try:
            resp = await inner(ctx)
        except ResilienceError as exc:
            if exc.failure is not None:
                breaker.record(False, clock.now() - t0)
            else:
                breaker.cancel()
            raise
        except asyncio.CancelledError:
            now = clock.now()
            losers = ctx.losers
            if losers is not None and asyncio.current_task() in losers:
                breaker.cancel()  # a losing hedge: its call was answered by another copy
            elif ctx.expired and not ctx.caller_bound:
                breaker.record(False, now - t0)  # cut by the service's deadline: a timeout
            elif ctx.expired:
                breaker.cancel()  # cut by the caller's shorter deadline: not the upstream's fault
            else:
                breaker.cancel()  # the caller went away: no outcome
            raise
        except BaseException:
            breaker.cancel()
            raise
        breaker.record(resp.status_code < 500, clock.now() - t0)
        return resp

    return guarded
