"""`retry`: run attempts with backoff, `Retry-After`, the retry budget and the deadline rules."""

from __future__ import annotations

import httpx

from policies.answers import response_or_raise
from policies.context import CallContext, Handler
from policies.errors import DeadlineExceeded, ResilienceError
from policies.retry import parse_retry_after, retry_fits
from policies.stage import StageParts
from policies.timers import fmt_s


def build(parts: StageParts, inner: Handler) -> Handler | None:
    """Retry what the policy matches, while it is safe (method, replayable body), the
    budget allows and the deadline leaves time for another attempt."""
    policy = parts.retry
    if policy is None:
        return None
    order = parts.order
    # With the timeout outside the retries (the default), the deadline bounds them;
    # with it inside, only a caller's incoming deadline does.
    deadline_outside = "timeout" in order and order.index("timeout") < order.index("retry")
    budget = parts.budget
    env = parts.env
    clock = env.clock
    rng = env.rng
    obs = env.observer
    name = parts.service
    latency = parts.latency

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
                    retry_after = parse_retry_after(ra, clock.wall())
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
