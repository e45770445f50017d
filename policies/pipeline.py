"""ServicePlan -> live policies: the runtime of one plan, built in the order the plan states.

A plan becomes a `PlanRuntime`: one `ServiceRuntime` per service, and in it one
`ShardRuntime` per shard (an unsharded service has a single, unnamed one). A shard
runtime owns the live primitives built from its spec (breaker, limiter, bulkhead,
budget, latency window, endpoints, balancer, health, chaos, fallbacks) and a *chain*:
one async stage per entry of `ServicePlan.order`, outermost first, ending in the
`balance` stage that picks an endpoint and sends the attempt through the inner
transport. Each stage is `async (ctx) -> httpx.Response` and calls the next one; a
policy that is not configured is left out of the chain entirely (no cost).

Failures travel as exceptions of `policies.errors` (an attempt's own failure carries
`.failure` = connect-failure | reset | timeout); the service edge turns them into
riprap's answers. Responses travel unbuffered: the upstream's stream is wrapped once in
a `CallStream` that runs release callbacks (endpoint in-flight count, concurrency slot)
when it is closed, and can tee the body into the stale cache.

Reload (`PlanRuntime(plan, env, previous=old)`) carries over the live state of
whatever did not change, piece by piece: an endpoint whose spec is the same keeps its
health and ejection state; a breaker, limiter, bulkhead or budget whose spec is the
same is the very same object; latency windows and balancers carry over while the
endpoint list is the same; the stale cache carries over while the service keeps a
stale fallback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Sequence

import httpx

from dsl.plan import (
    IDEMPOTENT_METHODS,
    FallbackSpec,
    Plan,
    ServicePlan,
    ShardPlan,
)
from policies.balancer import Balancer, make_balancer
from policies.breaker import CircuitBreaker
from policies.budget import RetryBudget
from policies.bulkhead import Bulkhead
from policies.chaos import ChaosInjector
from policies.errors import (
    FALLBACK_HEADER,
    REASON_HEADER,
    BadRequest,
    BreakerOpen,
    DeadlineExceeded,
    NoHealthyEndpoint,
    Overloaded,
    RateLimited,
    ResilienceError,
    UpstreamFailed,
)
from policies.fallback import StaleCache, StaticAnswer, cache_key
from policies.health import ActiveHealth, EndpointState, OutlierDetector, select_tier
from policies.hedge import HedgeDelay
from policies.latency import LatencyWindow
from policies.limiter import KeyedLimiter
from policies.retry import RetryPolicy, parse_retry_after, retry_fits
from policies.sharding import Rendezvous, extract_key

from policies.answers import STATUS_CLASS as _STATUS_CLASS
from policies.answers import chaos_abort_response
from policies.answers import classify as _classify
from policies.answers import error_response
from policies.answers import fallback_response as _answer
from policies.answers import response_or_raise as _result
from policies.context import SPENT as _SPENT
from policies.context import CallContext, Handler
from policies.context import idempotent as _idempotent
from policies.endpoint import EndpointRuntime
from policies.endpoint import release_in_flight as _decrement
from policies.env import Env
from policies.headers import NOT_CACHED as _NOT_CACHED
from policies.headers import DEADLINE_BYTES as _DEADLINE_BYTES
from policies.headers import forward_headers as _forward_headers
from policies.headers import parse_deadline_header
from policies.safe_observer import SafeObserver
from policies.streams import CallStream, StaleTee, call_stream, on_close
from policies.timers import ClockTimeout, LoopTimeout, deadline_scope
from policies.timers import fmt_s as _fmt_s

log = logging.getLogger("riprap.policies")

STAGES = ("fallback", "limit", "concurrency", "timeout", "retry", "hedge", "breaker",
          "chaos", "balance")

_MAX_FALLBACK_DEPTH = 8


# --------------------------------------------------------------------------- shards


def _carry(prev_spec: Any, prev_obj: Any, spec: Any, build: Callable[[], Any]) -> Any:
    """The previous live object when its spec did not change, else a new one."""
    if prev_obj is not None and prev_spec == spec:
        return prev_obj
    return build()


class ShardRuntime:
    """The live policies of one shard (or of an unsharded service) and its call chain."""

    def __init__(self, service: "ServiceRuntime", name: str | None,
                 spec: ServicePlan | ShardPlan, env: Env, order: Sequence[str],
                 shared: "ServiceRuntime | None", previous: "ShardRuntime | None") -> None:
        self.service = service
        self.service_name = service.name
        self.name = name
        self.spec = spec
        self.env = env
        prev = previous
        clock = env.clock
        obs = env.observer

        # endpoints: carried one by one when their spec is unchanged
        prev_eps = {e.spec.url: e for e in prev.endpoints} if prev else {}
        self.endpoints: list[EndpointRuntime] = []
        for ep_spec in spec.endpoints:
            old = prev_eps.get(ep_spec.url)
            state = old.state if old is not None and old.spec == ep_spec else EndpointState.from_spec(ep_spec)
            self.endpoints.append(EndpointRuntime(ep_spec, state))
        self.states = [e.state for e in self.endpoints]
        self._by_state = {id(e.state): e for e in self.endpoints}
        same_eps = prev is not None and prev.spec.endpoints == spec.endpoints

        self.latency: LatencyWindow = prev.latency if same_eps and prev else LatencyWindow()
        self.balancer: Balancer = (
            prev.balancer if same_eps and prev and prev.spec.balance == spec.balance
            else make_balancer(spec.balance, env.rng))
        self.outlier = OutlierDetector(spec.outlier, clock) if spec.outlier else None
        self.active = ActiveHealth(spec.health) if spec.health else None

        def on_breaker(state: str, _s: str = service.name, _n: str | None = name) -> None:
            obs.breaker_changed(_s, _n, state)

        self.breaker: CircuitBreaker | None = (
            _carry(prev.spec.breaker if prev else None, prev.breaker if prev else None,
                   spec.breaker, lambda: CircuitBreaker(spec.breaker, clock, on_breaker))
            if spec.breaker else None)

        # limit / concurrency / budget: a shard whose spec is the service's shares the
        # service's object (the contract scopes these to "calls to the service").
        def shared_or_own(kind: str, build: Callable[[], Any]) -> Any:
            mine = getattr(spec, kind) if kind != "budget" else _budget_spec(spec)
            if mine is None:
                return None
            if shared is not None:
                theirs = getattr(shared.spec, kind) if kind != "budget" else _budget_spec(shared.spec)
                if theirs == mine:
                    return shared.shared_objects[kind]
            prev_obj = prev.objects.get(kind) if prev else None
            prev_spec = (getattr(prev.spec, kind) if kind != "budget" else _budget_spec(prev.spec)) if prev else None
            return _carry(prev_spec, prev_obj, mine, build)

        self.limiter: KeyedLimiter | None = shared_or_own(
            "limit", lambda: KeyedLimiter(spec.limit, clock))
        self.bulkhead: Bulkhead | None = shared_or_own(
            "concurrency", lambda: Bulkhead(spec.concurrency, clock))
        self.budget: RetryBudget | None = shared_or_own(
            "budget", lambda: RetryBudget(_budget_spec(spec), clock))
        self.objects: dict[str, Any] = {
            "limit": self.limiter, "concurrency": self.bulkhead, "budget": self.budget}

        self.retry = RetryPolicy(spec.retry) if spec.retry and spec.retry.retries > 0 else None
        self.hedge = HedgeDelay(spec.hedge, self.latency) if spec.hedge else None
        self.chaos = ChaosInjector(spec.chaos, env.rng) if spec.chaos and env.chaos else None
        self.fallbacks: list[tuple[FallbackSpec, StaticAnswer | None]] = [
            (f, StaticAnswer.from_spec(f) if f.kind == "static" else None) for f in spec.fallbacks]
        self.has_fallback = bool(self.fallbacks)
        # Could a call ever send its body twice? If not, bodies stream straight through.
        self.needs_replay = bool(self.retry or self.hedge or any(
            f.kind == "service" for f in spec.fallbacks))
        self.stale_ages = [f.max_age for f in spec.fallbacks if f.kind == "stale"]
        self.chain: Handler = self._build_chain(order)

    # -- building ------------------------------------------------------------------

    def _build_chain(self, order: Sequence[str]) -> Handler:
        names = list(order)
        unknown = [n for n in names if n not in STAGES]
        if unknown:
            raise ValueError(
                f"service '{self.service_name}': unknown polic{'ies' if len(unknown) > 1 else 'y'} "
                f"{', '.join(map(repr, unknown))} in order (expected {', '.join(STAGES)})")
        if len(set(names)) != len(names):
            raise ValueError(f"service '{self.service_name}': a policy appears twice in order {names}")
        if "balance" in names and names[-1] != "balance":
            raise ValueError(f"service '{self.service_name}': 'balance' must come last in order {names}")
        self._order = names
        handler: Handler = self._send
        builders: dict[str, Callable[[Handler], Handler | None]] = {
            "fallback": self._fallback_stage,
            "limit": self._limit_stage,
            "concurrency": self._concurrency_stage,
            "timeout": self._timeout_stage,
            "retry": self._retry_stage,
            "hedge": self._hedge_stage,
            "breaker": self._breaker_stage,
            "chaos": self._chaos_stage,
        }
        for name in reversed(names):
            if name == "balance":
                continue
            wrapped = builders[name](handler)
            if wrapped is not None:
                handler = wrapped
        return handler

    # -- stages (each returns None when its policy is off) ----------------------------

    def _fallback_stage(self, inner: Handler) -> Handler | None:
        if not self.fallbacks:
            return None
        shard = self

        async def fallback(ctx: CallContext) -> httpx.Response:
            try:
                resp = await inner(ctx)
            except (RateLimited, BadRequest):
                raise  # refusals of the caller's own request are not failures to cover
            except ResilienceError as exc:
                answer = await shard.fallback_answer(ctx, exc.reason)
                if answer is None:
                    raise
                return answer
            if resp.status_code >= 500:
                try:
                    answer = await shard.fallback_answer(ctx, "upstream-failed")
                except BaseException:
                    await resp.aclose()  # cancelled while the fallback was asked
                    raise
                if answer is not None:
                    await resp.aclose()
                    return answer
            return resp

        return fallback

    def _limit_stage(self, inner: Handler) -> Handler | None:
        limiter = self.limiter
        if limiter is None:
            return None
        per_header = limiter.per_header
        obs = self.env.observer
        name = self.service_name

        async def limit(ctx: CallContext) -> httpx.Response:
            key = ctx.request.headers.get(per_header) if per_header else None
            wait = limiter.try_take(key)
            if wait:
                obs.rejected(name, "limit")
                raise RateLimited(f"rate limit of service '{name}' reached", retry_after=wait)
            return await inner(ctx)

        return limit

    def _concurrency_stage(self, inner: Handler) -> Handler | None:
        bulkhead = self.bulkhead
        if bulkhead is None:
            return None
        obs = self.env.observer
        name = self.service_name

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

    def _timeout_stage(self, inner: Handler) -> Handler | None:
        timeout = self.spec.timeout
        env = self.env
        clock = env.clock
        name = self.service_name

        async def deadline(ctx: CallContext) -> httpx.Response:
            now = clock.now()
            end = now + timeout
            incoming = ctx.incoming_deadline
            if incoming is not None and incoming < end:
                end = incoming
            ctx.deadline = end
            ctx.expired = False
            left = end - now
            if left <= 0:
                raise DeadlineExceeded(f"no time left for service '{name}'")
            try:
                async with deadline_scope(env, left, ctx):
                    return await inner(ctx)
            except TimeoutError:
                # failure="timeout": a retry stage placed outside the timeout retries it
                raise DeadlineExceeded(
                    f"service '{name}' did not answer within {_fmt_s(left)}",
                    failure="timeout") from None

        return deadline

    def _retry_stage(self, inner: Handler) -> Handler | None:
        policy = self.retry
        if policy is None:
            return None
        budget = self.budget
        env = self.env
        clock = env.clock
        rng = env.rng
        obs = env.observer
        name = self.service_name
        latency = self.latency
        # With the timeout outside the retries (the default), the deadline bounds them;
        # with it inside, only a caller's incoming deadline does.
        order = self._order
        deadline_outside = "timeout" in order and order.index("timeout") < order.index("retry")

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
                    return _result(resp, error)
                if not policy.retryable(ctx.method, ctx.request.headers, failure, status):
                    obs.retry_refused(name, "method")  # not safe to send twice
                    return _result(resp, error)
                if not ctx.replayable:
                    obs.retry_refused(name, "body")
                    return _result(resp, error)
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
                        return _result(resp, error)
                    if retry_after is not None and retry_after > wait:
                        wait = retry_after
                    if not retry_fits(left, wait, median):
                        obs.retry_refused(name, "deadline")
                        if resp is not None:
                            await resp.aclose()
                        raise DeadlineExceeded(
                            f"service '{name}': {_fmt_s(max(left, 0.0))} left, too little for a retry")
                elif retry_after is not None and retry_after > wait:
                    wait = retry_after
                if budget is not None and not budget.try_spend():
                    obs.retry_refused(name, "budget")
                    return _result(resp, error)
                if resp is not None:
                    await resp.aclose()
                obs.retried(name)
                retries += 1
                previous = wait
                if wait > 0:
                    await clock.sleep(wait)

        return retry

    def _hedge_stage(self, inner: Handler) -> Handler | None:
        hedge = self.hedge
        if hedge is None:
            return None
        methods = self.spec.retry.methods if self.spec.retry else IDEMPOTENT_METHODS
        shard = self

        async def hedged(ctx: CallContext) -> httpx.Response:
            if not _idempotent(ctx, methods):
                return await inner(ctx)
            await ctx.prepare_body()
            if not ctx.replayable:
                return await inner(ctx)
            return await _HedgeRun(shard, hedge, inner, ctx).run()

        return hedged

    def _breaker_stage(self, inner: Handler) -> Handler | None:
        breaker = self.breaker
        if breaker is None:
            return None
        clock = self.env.clock
        name = self.service_name
        shard = self.name

        async def guarded(ctx: CallContext) -> httpx.Response:
            if not breaker.allow():
                where = f"service '{name}'" + (f" shard '{shard}'" if shard else "")
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
                elif ctx.expired:
                    breaker.record(False, now - t0)  # cut by the deadline: a timeout
                else:
                    breaker.cancel()  # the caller went away: no outcome
                raise
            except BaseException:
                breaker.cancel()
                raise
            breaker.record(resp.status_code < 500, clock.now() - t0)
            return resp

        return guarded

    def _chaos_stage(self, inner: Handler) -> Handler | None:
        chaos = self.chaos
        if chaos is None:
            return None
        clock = self.env.clock

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

    # -- the terminal stage: balance and send -------------------------------------

    async def _send(self, ctx: CallContext) -> httpx.Response:
        env = self.env
        clock = env.clock
        now = clock.now()
        candidates, panic = select_tier(self.states, now)
        if panic:
            # Panic ignores outlier ejections (a guess from recent failures), never a
            # failed active health check (an explicit "down"), and never when a
            # fallback can answer instead.
            candidates = [] if self.has_fallback else _panic_candidates(self.states)
            if not candidates:
                raise NoHealthyEndpoint(f"no healthy endpoint for service '{self.service_name}'"
                                        + (f" shard '{self.name}'" if self.name else ""))
        state = self.balancer.pick(candidates, ctx.tried)
        ep = self._by_state[id(state)]
        url = state.url
        ctx.tried.add(url)
        await ctx.prepare_body()
        request = self._upstream_request(ctx, ep, now)
        state.in_flight += 1
        ctx.attempts += 1
        t0 = clock.now()
        retry = self.spec.retry
        per_try = retry.per_try_timeout if retry is not None else None
        try:
            if per_try is not None:
                try:
                    async with deadline_scope(env, per_try):
                        resp = await env.inner.handle_async_request(request)
                except TimeoutError:
                    raise httpx.ReadTimeout(f"per-try timeout {_fmt_s(per_try)}", request=request) from None
            else:
                resp = await env.inner.handle_async_request(request)
        except httpx.HTTPError as exc:
            state.in_flight -= 1
            failure, error = _classify(exc, url)
            if failure is None:  # a request that cannot be sent says nothing of the endpoint
                env.observer.attempt_finished(self.service_name, url, "invalid-request",
                                              clock.now() - t0)
            else:
                self._record(state, False, failure, clock.now() - t0, latency=False)
            raise error from exc
        except asyncio.CancelledError:
            state.in_flight -= 1
            env.observer.attempt_finished(self.service_name, url, "cancelled", clock.now() - t0)
            raise
        except BaseException:
            state.in_flight -= 1
            raise
        elapsed = clock.now() - t0
        code = resp.status_code
        self._record(state, code < 500, _STATUS_CLASS.get(code // 100, "5xx"), elapsed,
                     latency=True)
        on_close(resp, _decrement(state))
        return resp

    def _upstream_request(self, ctx: CallContext, ep: EndpointRuntime, now: float) -> httpx.Request:
        headers = list(ctx.headers)
        headers.append((b"host", ep.authority))
        if ctx.deadline is not None:
            ms = int((ctx.deadline - now) * 1000)
            headers.append((_DEADLINE_BYTES, str(ms if ms > 1 else 1).encode()))
        body = ctx.body
        if body is not None:
            if body or ctx.method in ("POST", "PUT", "PATCH"):
                headers.append((b"content-length", str(len(body)).encode()))
            req = httpx.Request(ctx.method, ep.url_for(ctx.raw_path), headers=headers,
                                stream=httpx.ByteStream(body))
            req.read()
            return req
        # A body too big to replay: sent once, framed as the caller framed it.
        length = ctx.request.headers.get("content-length")
        if length is not None:
            headers.append((b"content-length", length.encode()))
        else:
            headers.append((b"transfer-encoding", b"chunked"))
        stream = ctx.stream
        ctx.stream = _SPENT
        if stream is _SPENT or stream is None:
            raise UpstreamFailed("the request body was already sent and cannot be replayed",
                                 failure=None)
        return httpx.Request(ctx.method, ep.url_for(ctx.raw_path), headers=headers,
                             stream=stream)

    def _record(self, state: EndpointState, ok: bool, outcome: str, elapsed: float,
                *, latency: bool) -> None:
        env = self.env
        if latency:
            self.latency.record(elapsed)
        outlier = self.outlier
        if outlier is not None and outlier.record(state, ok, self.states):
            env.observer.ejected(self.service_name, state.url)
        env.observer.attempt_finished(self.service_name, state.url, outcome, elapsed)

    # -- fallbacks ----------------------------------------------------------------

    async def fallback_answer(self, ctx: CallContext, reason: str) -> httpx.Response | None:
        """The first link of the fallback chain that has an answer, or None."""
        answer = await self._fallback_chain(ctx, reason)
        if answer is not None:
            ctx.fallback_used = answer.headers[FALLBACK_HEADER]
            ctx.fallback_reason = reason
        return answer

    async def _fallback_chain(self, ctx: CallContext, reason: str) -> httpx.Response | None:
        env = self.env
        for spec, static in self.fallbacks:
            if spec.kind == "static" and static is not None:
                return _answer(static.status, list(static.headers), static.body, "static", reason)
            if spec.kind == "stale":
                cache = self.service.stale_cache
                if cache is None or ctx.method not in ("GET", "HEAD"):
                    continue
                entry = cache.get(cache_key("GET", str(ctx.request.url)), spec.max_age or 0.0,
                                  env.clock.now())
                if entry is None:
                    continue
                body = entry.body if ctx.method == "GET" else b""
                return _answer(entry.status, list(entry.headers), body, "stale", reason)
            if spec.kind == "service" and spec.service:
                answer = await self._service_fallback(ctx, spec.service)
                if answer is not None:
                    answer.headers[FALLBACK_HEADER] = "service"
                    if REASON_HEADER not in answer.headers:
                        answer.headers[REASON_HEADER] = reason
                    return answer
        return None

    async def _service_fallback(self, ctx: CallContext, target: str) -> httpx.Response | None:
        other = ctx.runtime.services.get(target)
        if other is None or ctx.fallback_depth >= _MAX_FALLBACK_DEPTH:
            return None
        if ctx.stream is _SPENT:
            return None  # a big body went to the failed call and cannot be sent again
        await ctx.prepare_body()
        request = ctx.request
        if ctx.body is not None:
            stream: httpx.AsyncByteStream = httpx.ByteStream(ctx.body)
        else:  # a big body never sent (the call failed before): it can go once, here
            assert ctx.stream is not None
            stream, ctx.stream = ctx.stream, _SPENT
        request = httpx.Request(ctx.method, request.url, headers=request.headers.raw,
                                stream=stream, extensions=request.extensions)
        if ctx.body is not None:
            request.read()
        resp, attempts, _outcome, _kind = await other.call(
            ctx.runtime, request, ctx.incoming_deadline, depth=ctx.fallback_depth + 1)
        ctx.attempts += attempts
        if resp.status_code >= 500 or (REASON_HEADER in resp.headers
                                       and FALLBACK_HEADER not in resp.headers):
            await resp.aclose()
            return None
        return resp

    # -- health checks ------------------------------------------------------------

    async def health_loop(self) -> None:
        """Check every endpoint every `interval`; flip health on `fall`/`rise` in a row."""
        active = self.active
        assert active is not None and self.spec.health is not None
        spec = self.spec.health
        clock = self.env.clock
        while True:
            now = clock.now()
            due = [ep for ep in self.endpoints if active.due(ep.state, now)]
            if due:
                await asyncio.gather(*(self._check(ep, active, spec.timeout) for ep in due))
            # state carried over a reload keeps its schedule: no burst of checks
            wake = min(ep.state.next_check for ep in self.endpoints)
            await clock.sleep(max(wake - clock.now(), 0.001))

    async def _check(self, ep: EndpointRuntime, active: ActiveHealth, timeout: float) -> None:
        spec = self.spec.health
        assert spec is not None
        env = self.env
        raw = spec.path if spec.path.startswith("/") else "/" + spec.path
        request = httpx.Request(spec.method, ep.url_for(raw.encode("ascii")),
                                headers=[(b"host", ep.authority),
                                         (b"user-agent", b"riprap-health")])
        ok = False
        try:
            async with deadline_scope(env, timeout):
                resp = await env.inner.handle_async_request(request)
                try:
                    ok = active.expects(resp.status_code)
                finally:
                    await resp.aclose()
        except (httpx.HTTPError, TimeoutError, OSError):
            ok = False
        except Exception as exc:  # noqa: BLE001 - a broken check is a failed check, not a dead loop
            log.warning("health check of %s failed: %r", ep.state.url, exc)
            ok = False
        if active.observe(ep.state, ok, env.clock.now()):
            env.observer.health_changed(self.service_name, ep.state.url, ep.state.healthy)

    # -- state --------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "endpoints": [e.state.snapshot(now) for e in self.endpoints],
            "breaker": self.breaker.snapshot() if self.breaker is not None else None,
            "limiter": self.limiter.snapshot() if self.limiter is not None else None,
            "bulkhead": self.bulkhead.snapshot() if self.bulkhead is not None else None,
            "budget": self.budget.snapshot() if self.budget is not None else None,
            "latency": self.latency.snapshot(),
        }


class _HedgeRun:
    """One hedged attempt. The first copy runs inline in the caller's task (no task, no
    extra loop turn on the common path where it answers before the hedge delay); a
    timer launches extra copies as tasks. The first good answer wins: a winning extra
    copy cancels the inline one (like a timeout would), every loser is cancelled and
    its response, if it had one, closed.
    """

    __slots__ = ("shard", "hedge", "inner", "ctx", "env", "owner", "loop", "copies",
                 "extra", "timer", "winner", "settled", "inline", "base_cancels")

    def __init__(self, shard: "ShardRuntime", hedge: HedgeDelay, inner: Handler,
                 ctx: CallContext) -> None:
        self.shard = shard
        self.hedge = hedge
        self.inner = inner
        self.ctx = ctx
        self.env = shard.env
        self.owner = asyncio.current_task()
        self.loop = asyncio.get_running_loop()
        self.copies: list[asyncio.Task[httpx.Response]] = []
        self.extra = 0
        self.timer: Any = None
        self.winner: asyncio.Task[httpx.Response] | None = None
        self.settled = False
        self.inline = False
        self.base_cancels = self.owner.cancelling() if self.owner is not None else 0

    # -- the timer and the extra copies ---------------------------------------------

    def _arm(self) -> None:
        delay = self.hedge.delay()
        if self.env.system_clock:
            self.timer = self.loop.call_later(delay, self._fire)
        else:
            self.timer = self.loop.create_task(self._sleep_then_fire(delay))

    async def _sleep_then_fire(self, delay: float) -> None:
        await self.env.clock.sleep(delay)
        self._fire()

    def _stop_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()

    def _fire(self) -> None:
        self.timer = None
        if self.settled:
            return
        shard = self.shard
        obs = self.env.observer
        budget = shard.budget
        if budget is not None and not budget.try_spend():
            obs.retry_refused(shard.service_name, "budget")
            return
        self.extra += 1
        obs.hedged(shard.service_name)
        task = self.loop.create_task(self.inner(self.ctx))
        self.copies.append(task)
        task.add_done_callback(self._copy_done)
        if self.extra < self.hedge.max_extra:
            self._arm()

    def _copy_done(self, task: asyncio.Task[httpx.Response]) -> None:
        if self.settled or not self.inline or not _good(task):
            return  # the owner is waiting on the copies itself, or a loser finished
        self.settled = True
        self.winner = task
        owner = self.owner
        assert owner is not None
        self._losers().add(owner)
        owner.cancel()  # stop the inline copy; `run` turns this into the winner's answer

    def _losers(self) -> set[asyncio.Task[Any]]:
        if self.ctx.losers is None:
            self.ctx.losers = set()
        return self.ctx.losers

    async def _cleanup(self, keep: asyncio.Task[Any] | None) -> None:
        """Cancel every copy but `keep`, close what they answered, wait for them to end."""
        self._stop_timer()
        self.settled = True
        waiting = []
        for task in self.copies:
            if task is keep:
                continue
            self._losers().add(task)
            if not task.done():
                task.cancel()
                waiting.append(task)
            task.add_done_callback(_close_result)
        if waiting:
            await asyncio.wait(waiting)

    # -- the hedged attempt ---------------------------------------------------------

    async def run(self) -> httpx.Response:
        ctx = self.ctx
        owner = self.owner
        self._arm()
        self.inline = True
        resp: httpx.Response | None = None
        error: ResilienceError | None = None
        try:
            resp = await self.inner(ctx)
        except ResilienceError as exc:
            error = exc
        except asyncio.CancelledError:
            self.inline = False
            winner = self.winner
            if winner is None or owner is None:
                await self._cleanup(None)
                raise
            self._losers().discard(owner)
            if owner.uncancel() > self.base_cancels:  # cancelled from outside too: give up
                await self._cleanup(None)
                await winner.result().aclose()
                raise
            return await self._finish(winner)
        except BaseException:  # not an attempt's failure (a broken request body, a bug)
            self.inline = False
            await self._cleanup(None)
            raise
        self.inline = False
        if resp is not None and resp.status_code < 500:
            await self._cleanup_or_close(resp)
            return resp
        # The inline copy failed: wait for extra copies in flight, if any.
        self._stop_timer()
        pending = {t for t in self.copies if not t.done()}
        done_bad = [t for t in self.copies if t.done()]
        for t in done_bad:
            if _good(t):
                if resp is not None:
                    await resp.aclose()
                return await self._finish(t)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if _good(t):
                        if resp is not None:
                            await resp.aclose()
                        return await self._finish(t)
        except asyncio.CancelledError:
            if resp is not None:
                await resp.aclose()
            await self._cleanup(None)
            raise
        await self._cleanup_or_close(resp)  # every copy failed: the inline outcome stands
        return _result(resp, error)

    async def _finish(self, winner: asyncio.Task[httpx.Response]) -> httpx.Response:
        resp = winner.result()
        await self._cleanup_or_close(resp, keep=winner)
        return resp

    async def _cleanup_or_close(self, resp: httpx.Response | None,
                                keep: asyncio.Task[Any] | None = None) -> None:
        """Clean up; if cancelled meanwhile, the answer in hand is closed, not leaked."""
        try:
            await self._cleanup(keep)
        except BaseException:
            if resp is not None:
                await resp.aclose()
            raise


def _budget_spec(spec: ServicePlan | ShardPlan) -> Any:
    return spec.retry.budget if spec.retry is not None else None


def _panic_candidates(states: Sequence[EndpointState]) -> list[EndpointState]:
    """In panic: the lowest tier's endpoints that pass active checks, ejected or not."""
    best: int | None = None
    for st in states:
        if st.healthy and (best is None or st.tier < best):
            best = st.tier
    return [st for st in states if st.healthy and st.tier == best]


def _good(task: asyncio.Future[Any]) -> bool:
    if task.cancelled() or task.exception() is not None:
        return False
    return task.result().status_code < 500


def _close_result(task: asyncio.Future[Any]) -> None:
    """Close the response of a finished loser (a hedge that answered too late)."""
    if task.cancelled() or task.exception() is not None:
        return
    resp = task.result()
    asyncio.get_running_loop().create_task(resp.aclose())


# --------------------------------------------------------------------------- services


class ServiceRuntime:
    """A service: its shards (or single unnamed shard), shared objects and stale cache."""

    def __init__(self, spec: ServicePlan, env: Env, previous: "ServiceRuntime | None") -> None:
        self.name = spec.name
        self.spec = spec
        self.env = env
        prev = previous
        clock = env.clock
        # Objects a sharded service's shards share when their spec equals the service's.
        self.shared_objects: dict[str, Any] = {}
        if spec.shards:
            prev_shared = prev.shared_objects if prev and prev.spec.shards else {}

            def keep(kind: str, mine: Any, theirs: Any, build: Callable[[], Any]) -> Any:
                if mine is None:
                    return None
                return _carry(theirs, prev_shared.get(kind), mine, build)

            self.shared_objects = {
                "limit": keep("limit", spec.limit, prev.spec.limit if prev else None,
                              lambda: KeyedLimiter(spec.limit, clock)),
                "concurrency": keep("concurrency", spec.concurrency,
                                    prev.spec.concurrency if prev else None,
                                    lambda: Bulkhead(spec.concurrency, clock)),
                "budget": keep("budget", _budget_spec(spec),
                               _budget_spec(prev.spec) if prev else None,
                               lambda: RetryBudget(_budget_spec(spec), clock)),
            }
        has_stale = any(f.kind == "stale" for f in spec.fallbacks) or any(
            f.kind == "stale" for s in spec.shards for f in s.fallbacks)
        self.stale_cache: StaleCache | None = None
        if has_stale:
            self.stale_cache = prev.stale_cache if prev is not None and prev.stale_cache is not None else StaleCache()

        prev_shards = prev.shards if prev else {}
        self.shards: dict[str | None, ShardRuntime] = {}
        if spec.shards:
            for shard in spec.shards:
                self.shards[shard.name] = ShardRuntime(
                    self, shard.name, shard, env, spec.order, self, prev_shards.get(shard.name))
            self.shard_names = tuple(s.name for s in spec.shards)
            self._hrw: Rendezvous | None = Rendezvous(self.shard_names)
        else:
            self.shards[None] = ShardRuntime(self, None, spec, env, spec.order, None,
                                             prev_shards.get(None))
            self.shard_names = ()
            self._hrw = None
        self.sharding = spec.sharding
        self.single = self.shards.get(None)

    def pick_shard(self, request: httpx.Request) -> ShardRuntime:
        single = self.single
        if single is not None:
            return single
        sharding = self.sharding
        assert sharding is not None
        url = request.url
        key = extract_key(sharding, url.path, url.query.decode("latin-1"), request.headers)
        if key is None:
            if sharding.default is None:
                raise BadRequest(
                    f"service '{self.name}' is sharded by {sharding.by} {sharding.key} "
                    "and the request has no key (and there is no default shard)",
                    service=self.name)
            return self.shards[sharding.default]
        assert self._hrw is not None
        return self.shards[self._hrw.pick(key)]

    async def call(self, runtime: "PlanRuntime", request: httpx.Request,
                   incoming_deadline: float | None, depth: int = 0
                   ) -> tuple[httpx.Response, int, str, str | None]:
        """One call through the service's chain: (answer, attempts, outcome, fallback kind)."""
        env = self.env
        clock = env.clock
        start = clock.now()
        try:
            shard = self.pick_shard(request)
        except ResilienceError as exc:
            return error_response(exc), 0, exc.reason, None
        ctx = CallContext(runtime, self, shard, request, incoming_deadline, start, depth)
        try:
            resp = await shard.chain(ctx)
        except ResilienceError as exc:
            exc.attempts = ctx.attempts
            exc.service = self.name
            return error_response(exc), ctx.attempts, exc.reason, None
        fallback = ctx.fallback_used
        status = resp.status_code
        if fallback is not None:
            outcome = ctx.fallback_reason or "upstream-failed"
        elif status >= 500:
            outcome = "upstream-5xx"
        elif status >= 400:
            outcome = "upstream-4xx"
        else:
            outcome = "ok"
            if (shard.stale_ages and self.stale_cache is not None and ctx.method == "GET"
                    and 200 <= status < 300 and status != 206):
                self._tee(resp, request)
        return resp, ctx.attempts, outcome, fallback

    def _tee(self, resp: httpx.Response, request: httpx.Request) -> None:
        cache = self.stale_cache
        assert cache is not None
        key = cache_key("GET", str(request.url))
        headers = [(k, v) for k, v in resp.headers.multi_items() if k not in _NOT_CACHED]
        if resp.is_closed:  # read in full already (an in-memory inner transport)
            cache.put(key, resp.status_code, headers, resp.content, self.env.clock.now())
            return
        call_stream(resp).tee = StaleTee(cache, key, resp.status_code, headers, self.env.clock)

    def snapshot(self, now: float) -> dict[str, Any]:
        data: dict[str, Any] = {"hosts": list(self.spec.hosts)}
        if self.single is not None:
            data.update(self.single.snapshot(now))
        else:
            data["limiter"] = _snap(self.shared_objects.get("limit"))
            data["bulkhead"] = _snap(self.shared_objects.get("concurrency"))
            data["budget"] = _snap(self.shared_objects.get("budget"))
            data["shards"] = {name: s.snapshot(now) for name, s in self.shards.items()}
        data["stale_cache"] = self.stale_cache.snapshot() if self.stale_cache is not None else None
        return data


def _snap(obj: Any) -> Any:
    return obj.snapshot() if obj is not None else None


class PlanRuntime:
    """A whole plan, live: services by name and by host. Immutable once built."""

    def __init__(self, plan: Plan, env: Env, previous: "PlanRuntime | None" = None) -> None:
        self.plan = plan
        self.env = env
        prev_services = previous.services if previous else {}
        self.services: dict[str, ServiceRuntime] = {}
        for name, spec in plan.services.items():
            if spec.name != name:
                spec = _renamed(spec, name)
            self.services[name] = ServiceRuntime(spec, env, prev_services.get(name))
        self.hosts: dict[str, str] = {}
        for name, spec in plan.services.items():
            self.hosts.setdefault(name.lower(), name)
            for host in spec.hosts:
                self.hosts.setdefault(host.lower(), name)

    def service_for_host(self, host: str) -> str | None:
        """The service a Host names (its name or a `host` alias; case and port ignored)."""
        h = host.strip().lower()
        if h.startswith("["):
            h = h[: h.find("]") + 1]
        elif h.count(":") == 1:
            h = h.split(":", 1)[0]
        return self.hosts.get(h.rstrip("."))

    def health_shards(self) -> list[ShardRuntime]:
        return [s for svc in self.services.values() for s in svc.shards.values()
                if s.active is not None and s.endpoints]

    def snapshot(self) -> dict[str, Any]:
        now = self.env.clock.now()
        return {"services": {name: svc.snapshot(now) for name, svc in self.services.items()}}


def _renamed(spec: ServicePlan, name: str) -> ServicePlan:
    from dataclasses import replace
    return replace(spec, name=name)


__all__ = [
    "STAGES",
    "CallContext",
    "CallStream",
    "ClockTimeout",
    "Env",
    "PlanRuntime",
    "SafeObserver",
    "ServiceRuntime",
    "ShardRuntime",
    "error_response",
    "parse_deadline_header",
]
