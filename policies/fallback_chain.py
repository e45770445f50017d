"""The fallback chain of a failed call: `stale`, `static` and `service` links, tried in order.

A `static` answer is built once at load; a `stale` one comes from the service's cache
(GET and HEAD only); a `service` link sends the call again through that service's
whole chain, at most `MAX_FALLBACK_DEPTH` services deep.
"""

from __future__ import annotations

import httpx

from policies.answers import fallback_response
from policies.context import SPENT, CallContext
from policies.errors import FALLBACK_HEADER, REASON_HEADER
from policies.fallback import cache_key
from policies.stage import StageParts

MAX_FALLBACK_DEPTH = 8


async def fallback_answer(parts: StageParts, ctx: CallContext,
                          reason: str) -> httpx.Response | None:
    """The first link of the shard's fallback chain that has an answer, or None."""
    answer = await _first_answer(parts, ctx, reason)
    if answer is not None:
        ctx.fallback_used = answer.headers[FALLBACK_HEADER]
        ctx.fallback_reason = reason
    return answer


async def _first_answer(parts: StageParts, ctx: CallContext,
                        reason: str) -> httpx.Response | None:
    for spec, static in parts.fallbacks:
        if spec.kind == "static" and static is not None:
            return fallback_response(static.status, list(static.headers), static.body,
                                     "static", reason)
        if spec.kind == "stale":
            cache = parts.stale_cache
            if cache is None or ctx.method not in ("GET", "HEAD"):
                continue
            entry = cache.lookup(cache_key("GET", str(ctx.request.url)), ctx.request.headers,
                                 spec.max_age or 0.0, parts.env.clock.now())
            if entry is None:
                continue
            body = entry.body if ctx.method == "GET" else b""
            return fallback_response(entry.status, list(entry.headers), body, "stale", reason)
        if spec.kind == "service" and spec.service:
            answer = await _service_answer(ctx, spec.service)
            if answer is not None:
                answer.headers[FALLBACK_HEADER] = "service"
                if REASON_HEADER not in answer.headers:
                    answer.headers[REASON_HEADER] = reason
                return answer
    return None


async def _service_answer(ctx: CallContext, target: str) -> httpx.Response | None:
    """The call sent again through service `target`: its answer if below 500 and not one
    of riprap's own refusals, else None."""
    if not ctx.services.has_service(target) or ctx.fallback_depth >= MAX_FALLBACK_DEPTH:
        return None
    if ctx.stream is SPENT:
        return None  # a big body went to the failed call and cannot be sent again
    await ctx.prepare_body()
    request = ctx.request
    if ctx.body is not None:
        stream: httpx.AsyncByteStream = httpx.ByteStream(ctx.body)
    else:  # a big body never sent (the call failed before): it can go once, here
        assert ctx.stream is not None
        stream, ctx.stream = ctx.stream, SPENT
    request = httpx.Request(ctx.method, request.url, headers=request.headers.raw,
                            stream=stream, extensions=request.extensions)
    if ctx.body is not None:
        request.read()
    answered = await ctx.services.call_service(target, request, ctx.incoming_deadline,
                                               ctx.fallback_depth + 1)
    if answered is None:  # gone meanwhile (cannot happen: a runtime is immutable)
        return None
    resp, attempts = answered
    ctx.attempts += attempts
    if resp.status_code >= 500 or (REASON_HEADER in resp.headers
                                   and FALLBACK_HEADER not in resp.headers):
        await resp.aclose()
        return None
    return resp


__all__ = ["MAX_FALLBACK_DEPTH", "fallback_answer"]
