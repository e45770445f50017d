"""ServicePlan -> live policies: the runtime of one plan, and its carry-over on reload.

A plan becomes a `PlanRuntime`: one `ServiceRuntime` per service, and in it one
`ShardRuntime` per shard (an unsharded service has a single, unnamed one). A shard
runtime owns the live primitives built from its spec (breaker, limiter, bulkhead,
budget, latency window, endpoints, balancer, health, chaos, fallbacks), hands them to
its stages as one `StageParts` (`policies.stage`), and keeps the chain built from them
(`policies.pipeline`). `ServiceRuntime.call` is the service edge: it picks the shard,
runs the chain, and turns riprap's failures into answers.

Reload (`PlanRuntime(plan, env, previous=old)`) carries over the live state of
whatever did not change, piece by piece: an endpoint whose spec is the same keeps its
health and ejection state; a breaker, limiter, bulkhead or budget whose spec is the
same is the very same object; latency windows and balancers carry over while the
endpoint list is the same; the stale cache carries over while the service keeps a
stale fallback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from typing import Any, Callable

import httpx

from dsl.plan import FallbackSpec, Plan, ServicePlan, ShardPlan
from policies.answers import error_response
from policies.balancer import Balancer, make_balancer
from policies.breaker import CircuitBreaker
from policies.budget import RetryBudget
from policies.bulkhead import Bulkhead
from policies.chaos import ChaosInjector
from policies.context import CallContext
from policies.discovery import ResolvedLine, address_url, needs_lookup
from policies.endpoint import EndpointPool, EndpointRuntime
from policies.env import Env
from policies.errors import BadRequest, ResilienceError
from policies.fallback import StaleCache, StaticAnswer, cache_key, shared_cache_vary
from policies.headers import NOT_CACHED, forward_items, header_value, lower_ascii
from policies.health import ActiveHealth, EndpointState, OutlierDetector
from policies.health_checks import check as check_endpoint
from policies.health_checks import run_health_checks
from policies.hosts import HostTable
from policies.hedge import HedgeDelay
from policies.latency import LatencyWindow
from policies.limiter import KeyedLimiter
from policies.pipeline import Chain, build_chain
from policies.retry import RetryPolicy
from policies.shared_limit import SharedLimiter, StoreBinding, make_limiter
from policies.sharding import Rendezvous, extract_key
from policies.stage import StageParts
from policies.streams import StaleTee, call_stream
from policies.tls import tls_client


def _carry(prev_spec: Any, prev_obj: Any, spec: Any, build: Callable[[], Any]) -> Any:
    """The previous live object when its spec did not change, else a new one."""
    if prev_obj is not None and prev_spec == spec:
        return prev_obj
    return build()


class ShardRuntime:
    """The live policies of one shard (or of an unsharded service) and its call chain."""

    def __init__(self, service: "ServiceRuntime", name: str | None,
                 spec: ServicePlan | ShardPlan, env: Env, order: tuple[str, ...],
                 shared: "ServiceRuntime | None", previous: "ShardRuntime | None") -> None:
        self.service_name = service.name
        self.name = name
        self.spec = spec
        self.env = env
        prev = previous
        clock = env.clock
        obs = env.observer

        # endpoints: carried one by one when their spec is unchanged; a `resolve` line
        # (policies.discovery) is carried whole, with its addresses and their state, when
        # its URL, weight and tier are the same (bound to this shard when it goes live)
        prev_eps = {e.spec.url: e for e in prev.fixed} if prev else {}
        prev_lines = list(prev.lines) if prev else []
        self.fixed: list[EndpointRuntime] = []
        self.lines: list[ResolvedLine] = []
        self._items: list[EndpointRuntime | ResolvedLine] = []
        for ep_spec in spec.endpoints:
            if needs_lookup(ep_spec):
                line = next((ln for ln in prev_lines if ln.same_line(ep_spec)), None)
                if line is not None:
                    prev_lines.remove(line)
                else:
                    line = ResolvedLine(ep_spec, service.name, name)
                self.lines.append(line)
                self._items.append(line)
                continue
            old = prev_eps.get(ep_spec.url)
            state = old.state if old is not None and old.spec == ep_spec else EndpointState.from_spec(ep_spec)
            ep = EndpointRuntime(ep_spec, state, tls_client(spec.tls, ep_spec.url))
            self.fixed.append(ep)
            self._items.append(ep)
        self.pool = EndpointPool(self._pool_list())
        same_eps = prev is not None and prev.spec.endpoints == spec.endpoints

        self.latency: LatencyWindow = prev.latency if same_eps and prev else LatencyWindow()
        self.balancer: Balancer = (
            prev.balancer if same_eps and prev and prev.spec.balance == spec.balance
            else make_balancer(spec.balance, env.rng))
        self.outlier = OutlierDetector(spec.outlier, clock) if spec.outlier else None
        self.active = ActiveHealth(spec.health) if spec.health else None

        def on_breaker(state: str, _s: str = service.name, _n: str | None = name) -> None:
            obs.breaker_changed(_s, _n, state)

        breaker_spec = spec.breaker
        self.breaker: CircuitBreaker | None = (
            _carry(prev.spec.breaker if prev else None, prev.breaker if prev else None,
                   breaker_spec, lambda: CircuitBreaker(breaker_spec, clock, on_breaker))
            if breaker_spec else None)

        # limit / concurrency / budget: a shard whose spec is the service's shares the
        # service's object (the contract scopes these to "calls to the service").
        def shared_or_own(kind: str, build: Callable[[Any], Any]) -> Any:
            mine = _spec_of(spec, kind)
            if mine is None:
                return None
            if shared is not None and _spec_of(shared.spec, kind) == mine:
                return shared.shared_objects[kind]
            prev_obj = prev.objects.get(kind) if prev else None
            prev_spec = _spec_of(prev.spec, kind) if prev else None
            return _carry(prev_spec, prev_obj, mine, lambda: build(mine))

        self.limiter: KeyedLimiter | SharedLimiter | None = shared_or_own(
            "limit", lambda s: make_limiter(s, service.name, name, clock))
        self.bulkhead: Bulkhead | None = shared_or_own(
            "concurrency", lambda s: Bulkhead(s, clock))
        self.budget: RetryBudget | None = shared_or_own(
            "budget", lambda s: RetryBudget(s, clock))
        self.objects: dict[str, Any] = {
            "limit": self.limiter, "concurrency": self.bulkhead, "budget": self.budget}

        self.retry = RetryPolicy(spec.retry) if spec.retry and spec.retry.retries > 0 else None
        self.hedge = HedgeDelay(spec.hedge, self.latency) if spec.hedge else None
        self.chaos = ChaosInjector(spec.chaos, env.rng) if spec.chaos and env.chaos else None
        self.fallbacks: tuple[tuple[FallbackSpec, StaticAnswer | None], ...] = tuple(
            (f, StaticAnswer.from_spec(f) if f.kind == "static" else None) for f in spec.fallbacks)
        self.stale_ages = [f.max_age for f in spec.fallbacks if f.kind == "stale"]
        self.parts = StageParts(
            service=service.name, shard=name, spec=spec, order=order, env=env,
            pool=self.pool, balancer=self.balancer, latency=self.latency,
            limiter=self.limiter, bulkhead=self.bulkhead, breaker=self.breaker,
            retry=self.retry, budget=self.budget, hedge=self.hedge, chaos=self.chaos,
            outlier=self.outlier, fallbacks=self.fallbacks, stale_cache=service.stale_cache)
        self.needs_replay = self.parts.needs_replay
        self.chain: Chain = build_chain(self.parts)
        self.handler = self.chain.handler

    @property
    def endpoints(self) -> tuple[EndpointRuntime, ...]:
        return self.pool.endpoints

    # -- resolved lines (policies.discovery) ------------------------------------------

    def _pool_list(self) -> list[EndpointRuntime]:
        eps: list[EndpointRuntime] = []
        for item in self._items:
            if isinstance(item, ResolvedLine):
                eps.extend(item.endpoints)
            else:
                eps.append(item)
        return eps

    def bind_lines(self) -> None:
        """Make this shard the owner of its lines (when its runtime goes live): their new
        addresses become this shard's endpoints."""
        specs = [s for s in self.spec.endpoints if needs_lookup(s)]
        for line, ep_spec in zip(self.lines, specs, strict=True):
            line.spec = ep_spec
            if ep_spec.resolve is not None:
                line.every = ep_spec.resolve
            line.make_endpoint = functools.partial(self._new_address, line)
            line.on_change = self._addresses_changed
            if self.active is None:  # no checks here: nothing could bring a pending one in
                for ep in line.endpoints:
                    ep.state.healthy = True
        self.pool.replace(self._pool_list())

    def _new_address(self, line: ResolvedLine, address: str) -> EndpointRuntime:
        spec = line.spec
        url = address_url(spec.url, address)
        state = EndpointState(url=url, weight=spec.weight, tier=spec.tier)
        if self.active is not None:
            # health-checked before use: out until its first check passes (as Envoy does)
            state.healthy = False
            state.rise_count = self.active.spec.rise - 1
        return EndpointRuntime(spec, state, tls_client(self.spec.tls, url, server_name=line.name),
                               address=address)

    async def _addresses_changed(self, added: list[EndpointRuntime]) -> None:
        self.pool.replace(self._pool_list())  # one assignment: calls read it once
        active = self.active
        if added and active is not None and self.spec.health is not None:
            timeout = self.spec.health.timeout
            await asyncio.gather(*(check_endpoint(self.parts, ep, active, timeout)
                                   for ep in added))

    async def health_loop(self) -> None:
        """The shard's active health checks, until cancelled (`policies.health_checks`)."""
        assert self.active is not None
        await run_health_checks(self.parts, self.active)

    # -- state --------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        data = {
            "endpoints": [_endpoint_snapshot(e, now) for e in self.endpoints],
            "breaker": _snap(self.breaker),
            "limiter": _snap(self.limiter),
            "bulkhead": _snap(self.bulkhead),
            "budget": _snap(self.budget),
            "latency": self.latency.snapshot(),
        }
        if self.lines:  # each resolved line, with its addresses under it
            data["lines"] = [dict(ln.snapshot(), endpoints=[
                _endpoint_snapshot(e, now) for e in ln.endpoints]) for ln in self.lines]
        return data


def _endpoint_snapshot(ep: EndpointRuntime, now: float) -> dict[str, Any]:
    snap = ep.state.snapshot(now)
    if ep.address is not None:
        snap["line"] = ep.spec.url
        snap["address"] = ep.address
    return snap


def _budget_spec(spec: ServicePlan | ShardPlan) -> Any:
    return spec.retry.budget if spec.retry is not None else None


def _spec_of(spec: ServicePlan | ShardPlan, kind: str) -> Any:
    """The spec of a service-scoped object: `limit`, `concurrency` or the retry `budget`."""
    return _budget_spec(spec) if kind == "budget" else getattr(spec, kind)


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

            def keep(kind: str, build: Callable[[Any], Any]) -> Any:
                mine = _spec_of(spec, kind)
                if mine is None:
                    return None
                theirs = _spec_of(prev.spec, kind) if prev else None
                return _carry(theirs, prev_shared.get(kind), mine, lambda: build(mine))

            self.shared_objects = {
                "limit": keep("limit", lambda s: make_limiter(s, spec.name, None, clock)),
                "concurrency": keep("concurrency", lambda s: Bulkhead(s, clock)),
                "budget": keep("budget", lambda s: RetryBudget(s, clock)),
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
            self._hrw: Rendezvous | None = Rendezvous(tuple(s.name for s in spec.shards))
        else:
            self.shards[None] = ShardRuntime(self, None, spec, env, spec.order, None,
                                             prev_shards.get(None))
            self._hrw = None
        self._picked: dict[str, str] = {}  # shard key -> shard name (bounded)
        self.sharding = spec.sharding
        # The headers a call looks up (shard key, per-header limit, Idempotency-Key),
        # lower-cased: their values are collected on the one pass over the headers.
        wanted: set[bytes] = set()
        names: list[str] = []
        if spec.sharding is not None and spec.sharding.by == "header":
            names.append(spec.sharding.key)
        for shard_rt in self.shards.values():
            if shard_rt.limiter is not None and shard_rt.limiter.per_header:
                names.append(shard_rt.limiter.per_header)
            if shard_rt.hedge is not None:
                names.append("idempotency-key")
        for n in names:
            low = lower_ascii(n)
            if low is not None:  # else looked up the public way
                wanted.add(low)
        self.wanted_headers: frozenset[bytes] = frozenset(wanted)
        self._shard_header = lower_ascii(spec.sharding.key) if spec.sharding is not None else None
        self.single = self.shards.get(None)

    def pick_shard(self, request: httpx.Request,
                   found: dict[bytes, list[bytes]] | None = None) -> ShardRuntime:
        """The call's shard. `found`: the wanted headers' values (`forward_items`)."""
        single = self.single
        if single is not None:
            return single
        sharding = self.sharding
        assert sharding is not None
        lname = self._shard_header
        if found is not None and sharding.by == "header" and lname in self.wanted_headers:
            # = extract_key(sharding, ..., request.headers), from the one header pass
            key = header_value(found.get(lname), request.headers, sharding.key) or None
        elif sharding.by in ("header", "cookie"):  # the key is in the headers: skip the URL
            key = extract_key(sharding, "", "", request.headers)
        else:
            url = request.url
            key = extract_key(sharding, url.path, url.query.decode("latin-1"), request.headers)
        if key is None:
            if sharding.default is None:
                raise BadRequest(
                    f"service '{self.name}' is sharded by {sharding.by} {sharding.key} "
                    "and the request has no key (and there is no default shard)",
                    service=self.name)
            return self.shards[sharding.default]
        # The key's shard: rendezvous hashing is a pure function of the key (and the
        # shard names, fixed for this runtime), so recent keys' answers are kept.
        picked = self._picked
        name = picked.get(key)
        if name is None:
            assert self._hrw is not None
            name = self._hrw.pick(key)
            if len(key) <= 256:  # bounded: at most 4096 keys of at most 256 characters
                if len(picked) >= 4096:
                    picked.clear()
                picked[key] = name
        return self.shards[name]

    async def call(self, runtime: "PlanRuntime", request: httpx.Request,
                   incoming_deadline: float | None, depth: int = 0,
                   start: float | None = None
                   ) -> tuple[httpx.Response, int, str, str | None]:
        """One call through the service's chain: (answer, attempts, outcome, fallback kind).

        `start`: the clock reading at the call's start, when the caller has one."""
        if start is None:
            start = self.env.clock.now()
        scanned = forward_items(request.headers, self.wanted_headers)  # the one pass
        try:
            shard = self.pick_shard(request, scanned[2])
        except ResilienceError as exc:
            return error_response(exc), 0, exc.reason, None
        ctx = CallContext(runtime, request, wanted=self.wanted_headers,
                          body_bound=self.spec.max_body_buffer, needs_replay=shard.needs_replay,
                          incoming_deadline=incoming_deadline, start=start, depth=depth,
                          scanned=scanned)
        try:
            resp = await shard.handler(ctx)
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
        vary = shared_cache_vary(request.headers, resp.headers)  # RFC 9111: storable?
        if vary is None:
            return
        key = cache.store_key(cache_key("GET", str(request.url)), vary, request.headers)
        headers = [(k, v) for k, v in resp.headers.multi_items() if k not in NOT_CACHED]
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
        data["stale_cache"] = _snap(self.stale_cache)
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
                spec = dataclasses.replace(spec, name=name)
            self.services[name] = ServiceRuntime(spec, env, prev_services.get(name))
        # `limit ... shared`: bind the shared limiters to the plan's store (ValueError without one)
        self.store_binding = StoreBinding(self.shared_limiters(), plan.store, plan.app, env)
        self.hosts = HostTable({name: spec.hosts for name, spec in plan.services.items()})
        # the service a Host names (its name or a `host` alias; case and port ignored)
        self.service_for_host = self.hosts.service_for_host

    def has_service(self, name: str) -> bool:
        return name in self.services

    async def call_service(self, name: str, request: httpx.Request,
                           incoming_deadline: float | None,
                           depth: int) -> tuple[httpx.Response, int] | None:
        """(answer, attempts) of `request` sent through service `name` (a `fallback
        service` link, `depth` links deep); None when the plan has no such service."""
        service = self.services.get(name)
        if service is None:
            return None
        resp, attempts, _outcome, _kind = await service.call(self, request, incoming_deadline,
                                                             depth=depth)
        return resp, attempts

    def shared_limiters(self) -> list[SharedLimiter]:
        found: dict[int, SharedLimiter] = {}
        for svc in self.services.values():
            for obj in (svc.shared_objects.get("limit"), *(s.limiter for s in svc.shards.values())):
                if isinstance(obj, SharedLimiter):
                    found[id(obj)] = obj
        return list(found.values())

    def release(self) -> None:
        """This runtime was replaced (or the transport closed): let go of the store."""
        self.store_binding.release()

    def health_shards(self) -> list[ShardRuntime]:
        return [s for svc in self.services.values() for s in svc.shards.values()
                if s.active is not None and (s.endpoints or s.lines)]

    def resolved_lines(self) -> list[tuple[ShardRuntime, ResolvedLine]]:
        """Every `resolve` line of the plan, with the shard it belongs to."""
        return [(s, ln) for svc in self.services.values() for s in svc.shards.values()
                for ln in s.lines]

    def snapshot(self) -> dict[str, Any]:
        now = self.env.clock.now()
        snap: dict[str, Any] = {
            "services": {name: svc.snapshot(now) for name, svc in self.services.items()}}
        stores = self.env.stores
        if self.store_binding.store is not None and stores is not None:
            snap["store"] = stores.snapshot()
        return snap


__all__ = ["PlanRuntime", "ServiceRuntime", "ShardRuntime"]
