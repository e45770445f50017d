"""`fallback`: if everything inside failed, answer from the fallback chain."""

from __future__ import annotations

import httpx

from policies.context import CallContext, Handler
from policies.errors import BadRequest, RateLimited, ResilienceError
from policies.fallback_chain import fallback_answer
from policies.stage import StageParts


def build(parts: StageParts, inner: Handler) -> Handler | None:
    """Answer from the fallback chain when the call failed (never for a refusal of the
    caller's own request: rate limit, missing shard key)."""
    if not parts.fallbacks:
        return None

    async def fallback(ctx: CallContext) -> httpx.Response:
        try:
            resp = await inner(ctx)
        except (RateLimited, BadRequest):
            raise  # refusals of the caller's own request are not failures to cover
        except ResilienceError as exc:
            answer = await fallback_answer(parts, ctx, exc.reason)
            if answer is None:
                raise
            return answer
        if resp.status_code >= 500:
            try:
                answer = await fallback_answer(parts, ctx, "upstream-5xx")
            except BaseException:
                await resp.aclose()  # cancelled while the fallback was asked
                raise
            if answer is not None:
                await resp.aclose()
                return answer
        return resp

    return fallback
