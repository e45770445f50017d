"""`balance`, the chain's terminal stage: one attempt upstream.

It picks the tier (health, ejection, failover, panic) and the endpoint (the balancer,
avoiding endpoints already tried), builds the upstream request, applies the per-try
timeout, sends through the inner transport, and records latency and outlier outcome.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

import httpx

from policies.answers import STATUS_CLASS, classify
from policies.context import SPENT, CallContext, Handler
from policies.endpoint import EndpointRuntime
from policies.errors import NoHealthyEndpoint, UpstreamFailed
from policies.httpx_compat import build_request
from policies.headers import DEADLINE_BYTES
from policies.health import EndpointState, select_tier
from policies.stage import StageParts
from policies.streams import on_close
from policies.timers import deadline_scope, fmt_s
from policies.tracing import CURRENT_CALL, AttemptSpan, with_trace_headers


def build(parts: StageParts, inner: Handler | None = None) -> Handler:
    """The shard's terminal stage (the handler every other stage ends up calling); it
    wraps nothing, so `inner` is ignored."""
    env = parts.env
    clock = env.clock
    obs = env.observer
    send = env.inner.handle_async_request
    service_name = parts.service
    pool = parts.pool
    balancer = parts.balancer
    latency_window = parts.latency
    outlier = parts.outlier
    has_fallback = bool(parts.fallbacks)
    retry = parts.spec.retry
    per_try = retry.per_try_timeout if retry is not None else None
    where = parts.where

    def record(state: EndpointState, ok: bool, outcome: str, elapsed: float,
               states: list[EndpointState], *, latency: bool) -> None:
        if latency:
            latency_window.record(elapsed)
        if outlier is not None and outlier.record(state, ok, states):
            obs.ejected(service_name, state.url)
        obs.attempt_finished(service_name, state.url, outcome, elapsed)

    async def balance(ctx: CallContext) -> httpx.Response:
        view = pool.view  # one read: a list replaced meanwhile does not change this attempt
        states = view.states
        now = clock.now()
        failed = ctx.failed
        if failed is None:
            candidates, panic = select_tier(states, now)
        else:  # a retry: what failed in this call counts as broken, unless that is all
            candidates, panic = select_tier(states, now, lambda s: s.url in failed)
            if panic:
                candidates, panic = select_tier(states, now)
        if panic:
            # Panic ignores outlier ejections (a guess from recent failures), never a
            # failed active health check (an explicit "down"), and never when a
            # fallback can answer instead.
            candidates = [] if has_fallback else panic_candidates(states)
            if not candidates:
                raise NoHealthyEndpoint(f"no healthy endpoint for {where}")
        state = balancer.pick(candidates, ctx.tried)
        ep = view.by_state[id(state)]
        url = state.url
        ctx.tried.add(url)
        t0 = now  # nothing below waits before the send, unless the body is read
        if ctx.body is None and ctx.stream is None:  # else ready (by the hedge stage)
            await ctx.prepare_body()
            t0 = clock.now()
        span: AttemptSpan | None = None
        if env.tracer is not None:  # tracing is on: this attempt gets its own span
            call_span = CURRENT_CALL.get()
            if call_span is not None:
                span = call_span.attempt(url, ctx.attempts + 1)
        try:
            request = upstream_request(ctx, ep, now, span)
        except BaseException:
            if span is not None:
                span.end("invalid-request")
            raise
        state.in_flight += 1
        ctx.attempts += 1
        try:
            if per_try is not None:
                # `async with deadline_scope(...)`, unrolled (no __aenter__/__aexit__ coroutines)
                scope = deadline_scope(clock, per_try)
                scope.enter()
                try:
                    resp = await send(request)
                except BaseException as exc:
                    try:
                        scope.leave(exc)
                    except TimeoutError:
                        exc = TimeoutError()
                    if isinstance(exc, TimeoutError):
                        raise httpx.ReadTimeout(f"per-try timeout {fmt_s(per_try)}",
                                                request=request) from None
                    raise
                scope.leave(None)
            else:
                resp = await send(request)
        except httpx.HTTPError as exc:
            state.in_flight -= 1
            failure, error = classify(exc, url)
            if failure is None:  # a request that cannot be sent says nothing of the endpoint
                obs.attempt_finished(service_name, url, "invalid-request", clock.now() - t0)
            else:
                record(state, False, failure, clock.now() - t0, states, latency=False)
                _mark_failed(ctx, url)
            if span is not None:
                span.end(failure or "invalid-request")
            raise error from exc
        except asyncio.CancelledError:
            state.in_flight -= 1
            obs.attempt_finished(service_name, url, "cancelled", clock.now() - t0)
            if span is not None:
                span.end("cancelled")
            raise
        except BaseException:
            state.in_flight -= 1
            if span is not None:
                span.end("error")
            raise
        elapsed = clock.now() - t0
        code = resp.status_code
        outcome = STATUS_CLASS.get(code // 100, "5xx")
        if span is not None:
            span.end(outcome, code)
        record(state, code < 500, outcome, elapsed, states, latency=True)
        if code >= 500:
            _mark_failed(ctx, url)
        on_close(resp, ep.release)
        return resp

    return balance


def _mark_failed(ctx: CallContext, url: str) -> None:
    if ctx.failed is None:
        ctx.failed = {url}
    else:
        ctx.failed.add(url)


def upstream_request(ctx: CallContext, ep: EndpointRuntime, now: float,
                     span: AttemptSpan | None = None) -> httpx.Request:
    """The attempt's request: the forwarded headers plus Host, the deadline left and the
    body's framing; a replayable body from memory, else the caller's stream, sent once.
    With an attempt `span`, the attempt's own traceparent replaces the caller's."""
    headers = list(ctx.headers) if span is None else with_trace_headers(ctx.headers, span)
    headers.append((b"host", b"host", ep.authority))
    if ctx.deadline is not None:
        ms = int((ctx.deadline - now) * 1000)
        headers.append((DEADLINE_BYTES, DEADLINE_BYTES, str(ms if ms > 1 else 1).encode()))
    body = ctx.body
    if body is not None:
        if body or ctx.method in ("POST", "PUT", "PATCH"):
            headers.append((b"content-length", b"content-length", str(len(body)).encode()))
        return build_request(ctx.method, ep.url_for(ctx.raw_path), headers,
                             httpx.ByteStream(body), body, dict(ep.extensions))
    # A body too big to replay: sent once, framed as the caller framed it.
    length = ctx.request.headers.get("content-length")
    if length is not None:
        headers.append((b"content-length", b"content-length", length.encode()))
    else:
        headers.append((b"transfer-encoding", b"transfer-encoding", b"chunked"))
    stream = ctx.stream
    ctx.stream = SPENT
    if stream is SPENT or stream is None:
        raise UpstreamFailed("the request body was already sent and cannot be replayed",
                             failure=None)
    return build_request(ctx.method, ep.url_for(ctx.raw_path), headers, stream, None,
                         dict(ep.extensions))


def panic_candidates(states: Sequence[EndpointState]) -> list[EndpointState]:
    """In panic: the lowest tier's endpoints that pass active checks, ejected or not."""
    best: int | None = None
    for st in states:
        if st.healthy and (best is None or st.tier < best):
            best = st.tier
    return [st for st in states if st.healthy and st.tier == best]
