"""The call flow: one async stage per entry of `ServicePlan.order`, built into a chain.

Each stage is `async (ctx) -> httpx.Response` and calls the next one, outermost first,
ending in the `balance` stage (`policies.attempt`) that picks an endpoint and sends the
attempt through the inner transport. A policy that is not configured is left out of
the chain entirely (no cost). Failures travel as exceptions of `policies.errors` (an
attempt's own failure carries `.failure` = connect-failure | reset | timeout); the
service edge (`ServiceRuntime.call`) turns them into riprap's answers.

The live policies a stage uses belong to its `ShardRuntime` (`policies.runtime`), built
from the plan before the chain is.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Callable, Sequence

import httpx

from dsl.plan import IDEMPOTENT_METHODS
from policies.answers import chaos_abort_response, response_or_raise
from policies.attempt import balance_stage
from policies.context import CallContext, Handler, idempotent
from policies.errors import (
    BadRequest,
    BreakerOpen,
    DeadlineExceeded,
    Overloaded,
    RateLimited,
    ResilienceError,
)
from policies.fallback_chain import fallback_answer
from policies.headers import lower_ascii
from policies.hedging import HedgeRun
from policies.retry import parse_retry_after, retry_fits
from policies.streams import on_close
from policies.timers import deadline_scope, fmt_s

if TYPE_CHECKING:
    from policies.runtime import ShardRuntime

STAGES = ("fallback", "limit", "concurrency", "timeout", "retry", "hedge", "breaker",
          "chaos", "balance")


def build_chain(shard: "ShardRuntime", order: Sequence[str]) -> Handler:
    """The shard's chain for `order` (outermost first); ValueError for a bad order."""
    names = list(order)
    where = f"service '{shard.service_name}'"
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(
            f"{where}: unknown polic{'ies' if len(unknown) > 1 else 'y'} "
            f"{', '.join(map(repr, unknown))} in order (expected {', '.join(STAGES)})")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: a policy appears twice in order {names}")
    if "balance" in names and names[-1] != "balance":
        raise ValueError(f"{where}: 'balance' must come last in order {names}")
    # With the timeout outside the retries (the default), the deadline bounds them;
    # with it inside, only a caller's incoming deadline does.
    deadline_outside = "timeout" in names and "retry" in names and (
        names.index("timeout") < names.index("retry"))
    handler: Handler = balance_stage(shard)
    for name in reversed(names):
        if name == "balance":
            continue
        if name == "retry":
            wrapped = _retry_stage(shard, handler, deadline_outside=deadline_outside)
        else:
            wrapped = _BUILDERS[name](shard, handler)
        if wrapped is not None:
            handler = wrapped
    return handler


# -- stages (each returns None when its policy is off) ----------------------------------


def _fallback_stage(shard: "ShardRuntime", inner: Handler) -> Handler | None:
    """If everything inside failed, answer from the fallback chain (never for a refusal
    of the caller's own request: rate limit, missing shard key)."""
    if not shard.fallbacks:
        return None

    async def fallback(ctx: CallContext) -> httpx.Response:
        try:
            resp = await inner(ctx)
        except (RateLimited, BadRequest):
            raise  # refusals of the caller's own request are not failures to cover
        except ResilienceError as exc:
            answer = await fallback_answer(shard, ctx, exc.reason)
            if answer is None:
                raise
            return answer
        if resp.status_code >= 500:
            try:
                answer = await fallback_answer(shard, ctx, "upstream-5xx")
            except BaseException:
                await resp.aclose()  # cancelled while the fallback was asked
                raise
            if answer is not None:
                await resp.aclose()
                return answer
        return resp

    return fallback


def _limit_stage(shard: "ShardRuntime", inner: Handler) -> Handler | None:
    """Take a token from the bucket (one bucket per header value with `per header`)."""
    limiter = shard.limiter
    if limiter is None:
        return None
    per_header = limiter.per_header
    lname = lower_ascii(per_header) if per_header else None
    obs = shard.env.observer
    name = shard.service_name

    async def limit(ctx: CallContext) -> httpx.Response:
        key = ctx.header(lname, per_header) if per_header else None  # = request.headers.get
        wait = limiter.try_take(key)
        if wait:
            obs.rejected(name, "limit")
            raise RateLimited(f"rate limit of service '{name}' reached", retry_after=wait)
        return await inner(ctx)

    return limit


def _concurrency_stage(shard: "ShardRuntime", inner: Handler) -> Handler | None:
    """Hold a bulkhead slot until the answer's body is closed."""
    bulkhead = shard.bulkhead
    if bulkhead is None:
        return None
    obs = shard.env.observer
    name = shard.service_name

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


def _timeout_stage(shard: "ShardRuntime", inner: Handler) -> Handler | None:
    """Bound everything inside by the call's deadline (capped by an incoming one)."""
    timeout = shard.spec.timeout
    env = shard.env
    clock = env.clock
    name = shard.service_name

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
        scope = deadline_scope(env, left, ctx)
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


def _retry_stage(shard: "ShardRuntime", inner: Handler, *,
                 deadline_outside: bool) -> Handler | None:
    """Run attempts with backoff, `Retry-After`, the budget and the deadline rules."""
    policy = shard.retry
    if policy is None:
        return None
    budget = shard.budget
    env = shard.env
    clock = env.clock
    rng = env.rng
    obs = env.observer
    name = shard.service_name
    latency = shard.latency

    async def retry(ctx: CallContext) -> httpx.Response:
        if budget is not None:
            budget.record_call()
        retries = 0
        previous: float | None = None
        while True:
            resp: httpx.Response | None = None
            error: ResilienceError | None = None
            try:
                resp = await inner(ctx)
            except ResilienceError as exc:
                if exc.failure is None:
                    raise  # riprap's own refusal (breaker open, no endpoint): not retried
                error = exc
            status = resp.status_code if resp is not None else None
            failure = error.failure if error is not None else None
            if retries >= policy.retries or not policy.matches(failure, status):
                return response_or_raise(resp, error)
            if not policy.retryable(ctx.method, ctx.request.headers, failure, status):
                obs.retry_refused(name, "method")  # not safe to send twice
                return response_or_raise(resp, error)
            if not ctx.replayable:
                obs.retry_refused(name, "body")
                return response_or_raise(resp, error)
            wait = policy.backoff_delay(retries + 1, rng, previous)
            retry_after = None
            if resp is not None:
                ra = resp.headers.get("retry-after")
                if ra is not None:
                    retry_after = parse_retry_after(ra, time.time())
            deadline = ctx.deadline if deadline_outside else ctx.incoming_deadline
            if deadline is not None:
                left = deadline - clock.now()
                median = latency.median()
                if retry_after is not None and retry_after > wait and not retry_fits(left, retry_after, median):
                    # The upstream asked for more time than the deadline leaves: its
                    # own answer (with its Retry-After) is the most useful one to pass on.
                    obs.retry_refused(name, "deadline")
                    return response_or_raise(resp, error)
                if retry_after is not None and retry_after > wait:
                    wait = retry_after
                if not retry_fits(left, wait, median):
                    obs.retry_refused(name, "deadline")
                    if resp is not None:
                        await resp.aclose()
                    raise DeadlineExceeded(
                        f"service '{name}': {fmt_s(max(left, 0.0))} left, too little for a retry")
            elif retry_after is not None and retry_after > wait:
                wait = retry_after
            if budget is not None and not budget.try_spend():
                obs.retry_refused(name, "budget")
                return response_or_raise(resp, error)
            if resp is not None:
                await resp.aclose()
            obs.retried(name)
            retries += 1
            previous = wait
            if wait > 0:
                await clock.sleep(wait)

    return retry


def _hedge_stage(shard: "ShardRuntime", inner: Handler) -> Handler | None:
    """Hedge idempotent requests with a replayable body (`policies.hedging`)."""
    hedge = shard.hedge
    if hedge is None:
        return None
    methods = shard.spec.retry.methods if shard.spec.retry else IDEMPOTENT_METHODS

    async def hedged(ctx: CallContext) -> httpx.Response:
        if ctx.method not in methods and not idempotent(ctx, methods):
            return await inner(ctx)
        if ctx.body is None and ctx.stream is None:
            await ctx.prepare_body()
        if not ctx.replayable:
            return await inner(ctx)
        return await HedgeRun(shard, hedge, inner, ctx).run()

    return hedged


def _breaker_stage(shard: "ShardRuntime", inner: Handler) -> Handler | None:
    """Refuse at once while the breaker is open; otherwise record the outcome."""
    breaker = shard.breaker
    if breaker is None:
        return None
    clock = shard.env.clock
    name = shard.service_name
    shard_name = shard.name

    async def guarded(ctx: CallContext) -> httpx.Response:
        if not breaker.allow():
            where = f"service '{name}'" + (f" shard '{shard_name}'" if shard_name else "")
            raise BreakerOpen(f"the breaker of {where} is open",
                              retry_in=breaker.retry_in())
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


def _chaos_stage(shard: "ShardRuntime", inner: Handler) -> Handler | None:
    """Inject the plan's chaos (only with `chaos=True`): an abort answers, a delay waits."""
    chaos = shard.chaos
    if chaos is None:
        return None
    clock = shard.env.clock

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



_BUILDERS: dict[str, Callable[["ShardRuntime", Handler], Handler | None]] = {
    "fallback": _fallback_stage,
    "limit": _limit_stage,
    "concurrency": _concurrency_stage,
    "timeout": _timeout_stage,
    "hedge": _hedge_stage,
    "breaker": _breaker_stage,
    "chaos": _chaos_stage,
}


__all__ = ["STAGES", "build_chain"]
