"""The pipeline's building blocks: plan -> runtime, the chain order, carry-over on reload,
shared objects, header and URL handling, streams, timeout scopes, the error tree."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import httpx
import pytest

from dsl.plan import (
    BreakerSpec,
    BudgetSpec,
    ConcurrencySpec,
    EndpointSpec,
    FallbackSpec,
    HedgeSpec,
    LimitSpec,
    Plan,
    RetrySpec,
    ServicePlan,
    ShardingSpec,
    ShardPlan,
)
from policies import errors
from policies.clock import FakeClock, SystemClock
from policies.endpoint import EndpointRuntime
from policies.env import Env
from policies.fallback import StaleCache
from policies.headers import forward_headers as _forward_headers
from policies.headers import parse_deadline_header
from policies.health import EndpointState
from policies.runtime import PlanRuntime
from policies.safe_observer import SafeObserver
from policies.streams import CallStream, StaleTee
from policies.timers import ClockTimeout
from riprap_testing.clock import VirtualClock


def env(clock: object | None = None, chaos: bool = False) -> Env:
    return Env(clock or FakeClock(), random.Random(1), SafeObserver(None),  # type: ignore[arg-type]
               httpx.MockTransport(lambda r: httpx.Response(200)), chaos)


def svc(name: str = "api", **kw: object) -> ServicePlan:
    kw.setdefault("endpoints", (EndpointSpec("http://127.0.0.1:9001"),))
    return ServicePlan(name=name, **kw)  # type: ignore[arg-type]


def chain_names(rt: PlanRuntime, service: str = "api", shard: str | None = None) -> tuple[str, ...]:
    """The stage names of a shard's chain, outermost first."""
    return rt.services[service].shards[shard].chain.names


# ------------------------------------------------------------------ building the chain


def test_only_configured_policies_enter_the_chain_in_plan_order() -> None:
    rt = PlanRuntime(Plan(services={"api": svc()}), env())
    assert chain_names(rt) == ("timeout", "balance")
    full = svc(retry=RetrySpec(2), hedge=HedgeSpec(delay=0.1), limit=LimitSpec(5, 5),
               breaker=BreakerSpec("consecutive", failures=3), concurrency=ConcurrencySpec(4),
               fallbacks=(FallbackSpec("static", status=503, body="x"),))
    rt = PlanRuntime(Plan(services={"api": full}), env())
    assert chain_names(rt) == ("fallback", "limit", "concurrency", "timeout", "retry",
                               "hedge", "breaker", "balance")
    swapped = dataclasses.replace(full, order=("limit", "fallback", "retry", "timeout", "hedge",
                                               "breaker", "concurrency", "chaos", "balance"))
    rt = PlanRuntime(Plan(services={"api": swapped}), env())
    assert chain_names(rt) == ("limit", "fallback", "retry", "timeout", "hedge", "breaker",
                               "concurrency", "balance")


def test_chaos_enters_the_chain_only_when_enabled() -> None:
    from dsl.plan import ChaosSpec
    p = Plan(services={"api": svc(chaos=(ChaosSpec("abort", 0.5),))})
    assert "chaos" not in chain_names(PlanRuntime(p, env()))
    assert chain_names(PlanRuntime(p, env(chaos=True))) == ("timeout", "chaos", "balance")


@pytest.mark.parametrize("order,message", [
    (("retry", "bogus", "balance"), "unknown policy 'bogus'"),
    (("retry", "retry", "balance"), "appears twice"),
    (("balance", "retry"), "'balance' must come last"),
])
def test_a_bad_order_is_a_clear_error(order: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PlanRuntime(Plan(services={"api": svc(order=order)}), env())


def test_a_missing_fallback_file_is_a_clear_error(tmp_path: object) -> None:
    bad = FallbackSpec("static", status=200, file="/nonexistent/riprap/fallback.json")
    with pytest.raises(ValueError, match="fallback.json"):
        PlanRuntime(Plan(services={"api": svc(fallbacks=(bad,))}), env())


# ------------------------------------------------------------------ carry-over


def test_reload_carries_each_piece_whose_spec_is_unchanged() -> None:
    e = env()
    breaker = BreakerSpec("consecutive", failures=3)
    old_spec = svc(endpoints=(EndpointSpec("http://127.0.0.1:9001"), EndpointSpec("http://127.0.0.1:9002")),
                   breaker=breaker, limit=LimitSpec(5, 5), concurrency=ConcurrencySpec(4),
                   retry=RetrySpec(2, budget=BudgetSpec(0.2)),
                   fallbacks=(FallbackSpec("stale", max_age=60.0),))
    old = PlanRuntime(Plan(services={"api": old_spec}), e)
    o = old.services["api"].single
    assert o is not None
    # change the limit and one endpoint's weight; keep the rest
    new_spec = dataclasses.replace(
        old_spec, limit=LimitSpec(9, 9),
        endpoints=(EndpointSpec("http://127.0.0.1:9001"), EndpointSpec("http://127.0.0.1:9002", weight=3)))
    new = PlanRuntime(Plan(services={"api": new_spec}), e, previous=old)
    n = new.services["api"].single
    assert n is not None
    assert n.breaker is o.breaker and n.bulkhead is o.bulkhead and n.budget is o.budget
    assert n.limiter is not o.limiter
    assert n.endpoints[0].state is o.endpoints[0].state
    assert n.endpoints[1].state is not o.endpoints[1].state and n.endpoints[1].state.weight == 3
    assert n.latency is not o.latency  # the endpoint list changed
    assert new.services["api"].stale_cache is old.services["api"].stale_cache


def test_shards_share_the_service_objects_unless_they_override_them() -> None:
    limit = LimitSpec(10, 10)
    shards = (ShardPlan("a", endpoints=(EndpointSpec("http://127.0.0.1:9001"),), limit=limit,
                        breaker=BreakerSpec("consecutive", failures=2)),
              ShardPlan("b", endpoints=(EndpointSpec("http://127.0.0.1:9002"),), limit=LimitSpec(1, 1),
                        breaker=BreakerSpec("consecutive", failures=2)))
    spec = ServicePlan(name="inv", sharding=ShardingSpec("header", "x-k"), shards=shards,
                       limit=limit, breaker=BreakerSpec("consecutive", failures=2))
    rt = PlanRuntime(Plan(services={"inv": spec}), env())
    svc_rt = rt.services["inv"]
    a, b = svc_rt.shards["a"], svc_rt.shards["b"]
    assert a.limiter is svc_rt.shared_objects["limit"]
    assert b.limiter is not svc_rt.shared_objects["limit"] and b.limiter is not None
    assert a.breaker is not b.breaker  # breakers are always per shard
    again = PlanRuntime(Plan(services={"inv": spec}), env(), previous=rt)
    assert again.services["inv"].shards["a"].limiter is a.limiter
    assert again.services["inv"].shards["b"].limiter is b.limiter
    assert again.services["inv"].shards["a"].breaker is a.breaker


def test_hosts_map_to_services_without_case_port_or_trailing_dot() -> None:
    rt = PlanRuntime(Plan(services={"api": svc(hosts=("API.internal",)), "b": svc("b")}), env())
    assert rt.service_for_host("api.INTERNAL:443") == "api"
    assert rt.service_for_host("api.internal.") == "api"
    assert rt.service_for_host("B") == "b"
    assert rt.service_for_host("[::1]:80") is None


# ------------------------------------------------------------------ headers and URLs


def test_forward_headers_drop_hop_by_hop_and_per_attempt_ones() -> None:
    raw = [(b"Host", b"api"), (b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"s"),
           (b"Keep-Alive", b"5"), (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3"),
           (b"x-riprap-deadline-ms", b"100"), (b"Accept", b"*/*"), (b"X-Two", b"1"), (b"X-Two", b"2")]
    assert _forward_headers(raw) == ([(b"Accept", b"*/*"), (b"X-Two", b"1"), (b"X-Two", b"2")],
                                     b"100")


@pytest.mark.parametrize("value,expected", [
    ("250", 1000.25), (" 1500 ", 1001.5), ("0", 1000.0), ("12.5", 1000.0125),
    ("-3", None), ("soon", None), ("nan", None), ("inf", None), (None, None),
])
def test_incoming_deadline_header(value: str | None, expected: float | None) -> None:
    got = parse_deadline_header(value, 1000.0)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_endpoint_urls_join_the_base_path_and_set_the_authority() -> None:
    e = EndpointRuntime(EndpointSpec("http://127.0.0.1:9001/v2/"), EndpointState("x"))
    assert str(e.url_for(b"/items?id=1")) == "http://127.0.0.1:9001/v2/items?id=1"
    assert e.authority == b"127.0.0.1:9001"
    six = EndpointRuntime(EndpointSpec("http://[::1]:8080"), EndpointState("y"))
    assert str(six.url_for(b"/")) == "http://[::1]:8080/"
    assert six.authority == b"[::1]:8080"
    plain = EndpointRuntime(EndpointSpec("https://example.internal"), EndpointState("z"))
    assert plain.authority == b"example.internal"
    assert str(plain.url_for(b"/a%20b")) == "https://example.internal/a%20b"


# ------------------------------------------------------------------ streams


async def test_call_stream_runs_its_release_callbacks_exactly_once() -> None:
    released: list[str] = []
    stream = CallStream(httpx.ByteStream(b"abc"))
    stream.on_close(lambda: released.append("slot"))
    stream.on_close(lambda: (_ for _ in ()).throw(RuntimeError("broken callback")))
    stream.on_close(lambda: released.append("endpoint"))
    assert b"".join([c async for c in stream]) == b"abc"
    await stream.aclose()
    await stream.aclose()
    assert released == ["slot", "endpoint"]
    stream.on_close(lambda: released.append("late"))  # already closed: runs at once
    assert released[-1] == "late"


async def test_stale_tee_keeps_complete_bodies_within_the_entry_bound() -> None:
    clock = FakeClock()
    cache = StaleCache(max_entry_bytes=64)
    tee = StaleTee(cache, "GET http://api/a", 200, [("x", "1")], clock)
    for chunk in (b"ab", b"cd"):
        tee.feed(chunk)
    tee.complete()
    assert cache.get("GET http://api/a", 10, clock.now()).body == b"abcd"  # type: ignore[union-attr]
    big = StaleTee(cache, "GET http://api/b", 200, [], clock)
    big.feed(b"x" * 100)
    big.complete()
    assert cache.get("GET http://api/b", 10, clock.now()) is None


# ------------------------------------------------------------------ timeout scopes


async def test_loop_timeout_turns_its_own_cancellation_into_timeout_error() -> None:
    with pytest.raises(TimeoutError):
        async with ClockTimeout(SystemClock(), 0.01):
            await asyncio.sleep(1)
    async with ClockTimeout(SystemClock(), 1.0) as scope:
        await asyncio.sleep(0)
    assert not scope.fired


async def test_loop_timeout_lets_an_outside_cancellation_through() -> None:
    async def guarded() -> None:
        async with ClockTimeout(SystemClock(), 10.0):
            await asyncio.sleep(10)

    task = asyncio.ensure_future(guarded())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_clock_timeout_fires_on_virtual_time(vclock: VirtualClock) -> None:
    t0 = vclock.now()
    with pytest.raises(TimeoutError):
        async with ClockTimeout(vclock, 0.5):
            await asyncio.Event().wait()
    assert vclock.now() - t0 == pytest.approx(0.5)


async def test_system_clock_timers_are_the_loops_own() -> None:
    clock = SystemClock()
    fired: list[str] = []
    timer = clock.call_later(0.001, lambda: fired.append("a"))
    assert isinstance(timer, asyncio.TimerHandle)  # one handle on the loop, no task
    clock.call_later(0.001, lambda: fired.append("b")).cancel()
    await asyncio.sleep(0.02)
    assert fired == ["a"]
    assert abs(clock.wall() - time.time()) < 1.0


async def test_fake_clock_timers_run_on_its_sleeps(vclock: VirtualClock) -> None:
    fired: list[float] = []
    vclock.call_later(0.5, lambda: fired.append(vclock.now()))
    vclock.call_later(0.2, lambda: fired.append(vclock.now())).cancel()
    wall0 = vclock.wall()
    await vclock.sleep(1.0)
    assert fired == [pytest.approx(1000.5)]
    assert vclock.wall() - wall0 == pytest.approx(1.0)


# ------------------------------------------------------------------ the error tree


@pytest.mark.parametrize("exc,reason,status", [
    (errors.UnknownService("x", ["a"]), "unknown-service", 404),
    (errors.BadRequest("no key"), "no-shard-key", 400),
    (errors.RateLimited(retry_after=0.2), "rate-limited", 429),
    (errors.Overloaded(), "overloaded", 503),
    (errors.BreakerOpen(), "breaker-open", 503),
    (errors.NoHealthyEndpoint(), "no-healthy-endpoint", 503),
    (errors.DeadlineExceeded(), "timeout", 504),
    (errors.UpstreamFailed(), "upstream-failed", 502),
])
def test_every_error_has_one_reason_and_status(exc: errors.ResilienceError, reason: str,
                                               status: int) -> None:
    assert isinstance(exc, errors.ResilienceError)
    assert (exc.reason, exc.status) == (reason, status)
    headers = dict(exc.headers())
    assert headers["x-riprap-reason"] == reason and headers["x-riprap-attempts"] == "0"


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    assert dict(errors.RateLimited(retry_after=0.2).headers())["retry-after"] == "1"
    assert dict(errors.RateLimited(retry_after=2.0).headers())["retry-after"] == "2"
    assert dict(errors.RateLimited(retry_after=2.01).headers())["retry-after"] == "3"


def test_safe_observer_swallows_observer_errors() -> None:
    told: list[str] = []

    class Boom:
        def __getattr__(self, name: str) -> object:
            def fail(*a: object) -> None:
                told.append(name)
                raise RuntimeError(name)
            return fail

    obs = SafeObserver(Boom())  # type: ignore[arg-type]
    obs.call_finished("s", "ok", 200, 1, 0.1, None)
    obs.attempt_finished("s", "e", "200", 0.1)
    obs.retried("s")
    obs.retry_refused("s", "budget")
    obs.hedged("s")
    obs.breaker_changed("s", None, "open")
    obs.ejected("s", "e")
    obs.rejected("s", "limit")
    obs.health_changed("s", "e", False)
    assert told == ["call_finished", "attempt_finished", "retried", "retry_refused", "hedged",
                    "breaker_changed", "ejected", "rejected", "health_changed"]
