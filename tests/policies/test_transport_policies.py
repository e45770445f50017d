"""ResilientTransport's stateful policies over in-memory upstreams: breaker, tiers, hedge,
fallbacks, sharding, outlier ejection, health checks, chaos, cancellation, hot reload."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest

from dsl.plan import (
    BreakerSpec,
    BudgetSpec,
    ChaosSpec,
    ConcurrencySpec,
    FallbackSpec,
    HealthSpec,
    HedgeSpec,
    LimitSpec,
    OutlierSpec,
    RetrySpec,
    ShardingSpec,
    ShardPlan,
)
from policies.sharding import shard_for
from riprap_testing.clock import VirtualClock
from test_transport_kit import (
    Recorder,
    TrackedStream,
    Upstream,
    ep,
    hang,
    make,
    plan,
    raises,
    sequence,
    service,
    status,
)

STATIC = FallbackSpec("static", status=503, body='{"error": "api unavailable"}',
                      content_type="application/json")
RETRY = RetrySpec(retries=1, on=("connect-failure", "reset", "5xx"))


async def settle(clock: VirtualClock) -> None:
    """Let background work (health checks) run before virtual time moves on."""
    await clock.sleep(0.001)


# ------------------------------------------------------------------ breaker


async def test_breaker_fails_fast_then_recovers_through_a_probe(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, sequence(status(503), status(503), status(503), status(200)))
    rec = Recorder()
    p = plan(service("api", breaker=BreakerSpec("consecutive", failures=3, open=30.0)))
    rt, client = make(p, up, vclock, observer=rec)
    async with client:
        for _ in range(3):
            assert (await client.get("/x")).status_code == 503
        r = await client.get("/x")
        assert r.status_code == 503
        assert r.headers["x-riprap-reason"] == "breaker-open"
        assert r.headers["x-riprap-attempts"] == "0"
        assert len(up.seen) == 3
        assert rt.snapshot()["services"]["api"]["breaker"]["state"] == "open"
        vclock.advance(30.0)
        r = await client.get("/x")  # the probe
        assert r.status_code == 200
        assert rt.snapshot()["services"]["api"]["breaker"]["state"] == "closed"
    assert [e[3] for e in rec.kinds("breaker")] == ["open", "half-open", "closed"]


async def test_breaker_counts_resets_and_timeouts_and_a_fallback_covers_it(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, sequence(raises(httpx.ReadError), hang))
    p = plan(service("api", timeout=0.5, fallbacks=(STATIC,),
                     breaker=BreakerSpec("consecutive", failures=2, open=10.0)))
    rt, client = make(p, up, vclock)
    async with client:
        r1 = await client.get("/x")
        r2 = await client.get("/x")
        r3 = await client.get("/x")
    assert [r.headers["x-riprap-reason"] for r in (r1, r2, r3)] == [
        "upstream-failed", "timeout", "breaker-open"]
    assert all(r.headers["x-riprap-fallback"] == "static" for r in (r1, r2, r3))
    assert r3.json() == {"error": "api unavailable"} and r3.status_code == 503
    assert r3.headers["x-riprap-attempts"] == "0"


async def test_each_shard_has_its_own_breaker(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, status(500))
    shards = (ShardPlan("a", endpoints=(ep(9001),), breaker=BreakerSpec("consecutive", failures=1)),
              ShardPlan("b", endpoints=(ep(9002),), breaker=BreakerSpec("consecutive", failures=1)))
    p = plan(service("inv", sharding=ShardingSpec("header", "x-shard-key"), shards=shards,
                     breaker=BreakerSpec("consecutive", failures=1)))
    key_a = next(k for k in map(str, range(100)) if shard_for(k, ["a", "b"]) == "a")
    key_b = next(k for k in map(str, range(100)) if shard_for(k, ["a", "b"]) == "b")
    rt, client = make(p, up, vclock)
    async with client:
        assert (await client.get("http://inv/x", headers={"x-shard-key": key_a})).status_code == 500
        r = await client.get("http://inv/x", headers={"x-shard-key": key_a})
        assert r.headers["x-riprap-reason"] == "breaker-open"
        assert (await client.get("http://inv/x", headers={"x-shard-key": key_b})).status_code == 200
    shards_state = rt.snapshot()["services"]["inv"]["shards"]
    assert shards_state["a"]["breaker"]["state"] == "open"
    assert shards_state["b"]["breaker"]["state"] == "closed"


# ------------------------------------------------------------------ tiers, outliers, health


async def test_failover_tier_takes_over_when_the_primaries_are_ejected(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, raises(httpx.ConnectError))
    rec = Recorder()
    p = plan(service("api", endpoints=(ep(9001), ep(9101, tier=1)), retry=RETRY,
                     outlier=OutlierSpec(failures=1, eject=30.0, max_fraction=1.0)))
    rt, client = make(p, up, vclock, observer=rec)
    async with client:
        r = await client.get("/x")
        assert r.text == "ok from 9101" and r.headers["x-riprap-attempts"] == "2"
        assert (await client.get("/x")).text == "ok from 9101"
        assert rec.kinds("ejected") == [("ejected", "api", "http://127.0.0.1:9001")]
        vclock.advance(30.0)  # the ejection ends: back to the primary
        up.on(9001, status(200, "primary back"))
        assert (await client.get("/x")).text == "primary back"
    assert up.ports() == [9001, 9101, 9101, 9001]


async def test_outlier_ejection_sends_calls_to_the_other_endpoints(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, status(500))
    p = plan(service("api", ports=(9001, 9002, 9003),
                     outlier=OutlierSpec(failures=2, eject=10.0, max_fraction=0.5)))
    rt, client = make(p, up, vclock)
    async with client:
        for _ in range(12):
            await client.get("/x")
        state = {e["url"][-4:]: e for e in rt.snapshot()["services"]["api"]["endpoints"]}
    assert state["9001"]["ejected"] is True and state["9001"]["ejections"] == 1
    assert up.ports().count(9001) == 2  # ejected after its second failure, never tried again


async def test_panic_tries_the_primaries_when_no_fallback_exists(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, sequence(raises(httpx.ConnectError), status(200, "still there")))
    p = plan(service("api", outlier=OutlierSpec(failures=1, max_fraction=1.0)))
    rt, client = make(p, up, vclock)
    async with client:
        assert (await client.get("/x")).status_code == 502
        r = await client.get("/x")  # the only endpoint is ejected: panic sends anyway
    assert r.text == "still there"


async def test_no_healthy_endpoint_goes_to_the_fallback_instead_of_panic(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, raises(httpx.ConnectError))
    p = plan(service("api", fallbacks=(STATIC,), outlier=OutlierSpec(failures=1, max_fraction=1.0)))
    rt, client = make(p, up, vclock)
    async with client:
        await client.get("/x")
        r = await client.get("/x")
    assert r.headers["x-riprap-reason"] == "no-healthy-endpoint"
    assert r.headers["x-riprap-fallback"] == "static"
    assert len(up.seen) == 1


async def test_active_health_checks_take_an_endpoint_out_and_back(vclock: VirtualClock) -> None:
    up = Upstream()
    healthy = {9001: False}

    def primary(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/healthz":
            return httpx.Response(200 if healthy[9001] else 500)
        return httpx.Response(200, text="primary")

    up.on(9001, primary)
    rec = Recorder()
    p = plan(service("api", endpoints=(ep(9001), ep(9101, tier=1)),
                     health=HealthSpec("/healthz", interval=1.0, timeout=0.2, fall=2, rise=1)))
    rt, client = make(p, up, vclock, observer=rec)
    async with client:
        await rt.start()
        await settle(vclock)
        assert (await client.get("/x")).text == "primary"  # one failed check: not yet
        await vclock.sleep(1.0)
        assert rec.kinds("health") == [("health", "api", "http://127.0.0.1:9001", False)]
        assert (await client.get("/x")).text == "ok from 9101"
        healthy[9001] = True
        await vclock.sleep(1.0)
        assert (await client.get("/x")).text == "primary"
        checks = [s for s in up.seen if s.url.endswith("/healthz")]
        assert checks[0].headers["host"] == "127.0.0.1:9001"
    assert rec.kinds("health")[-1] == ("health", "api", "http://127.0.0.1:9001", True)


# ------------------------------------------------------------------ hedging


async def test_the_hedge_wins_and_the_slow_copy_is_cancelled(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, hang)
    rec = Recorder()
    p = plan(service("api", ports=(9001, 9002), timeout=2.0, hedge=HedgeSpec(delay=0.08),
                     breaker=BreakerSpec("consecutive", failures=1)))
    rt, client = make(p, up, vclock, observer=rec)
    async with client:
        t0 = vclock.now()
        r = await client.get("/x")
        assert r.text == "ok from 9002"
        assert r.headers["x-riprap-attempts"] == "2"
        assert vclock.now() - t0 == pytest.approx(0.08)
        assert up.cancelled == [9001]
        # the cancelled loser is not a failure: the breaker (failures 1) stays closed
        assert rt.snapshot()["services"]["api"]["breaker"]["state"] == "closed"
        assert [e["in_flight"] for e in rt.snapshot()["services"]["api"]["endpoints"]] == [0, 0]
    assert rec.kinds("hedged") == [("hedged", "api")]


async def test_a_fast_answer_sends_no_hedge(vclock: VirtualClock) -> None:
    up = Upstream()
    p = plan(service("api", ports=(9001, 9002), hedge=HedgeSpec(delay=0.08)))
    rt, client = make(p, up, vclock)
    async with client:
        r = await client.get("/x")
        await vclock.sleep(1.0)  # the hedge timer was disarmed
    assert r.headers["x-riprap-attempts"] == "1" and len(up.seen) == 1


async def test_a_losing_bad_answer_is_closed_when_a_hedge_wins(vclock: VirtualClock) -> None:
    up = Upstream()
    bad = TrackedStream([b"oops"])

    async def slow_500(_r: httpx.Request) -> httpx.Response:
        await vclock.sleep(0.1)
        return httpx.Response(500, stream=bad)

    async def slower_200(_r: httpx.Request) -> httpx.Response:
        await vclock.sleep(0.1)
        return httpx.Response(200, text="hedge")

    up.on(9001, slow_500)
    up.on(9002, slower_200)
    p = plan(service("api", ports=(9001, 9002), hedge=HedgeSpec(delay=0.05)))
    rt, client = make(p, up, vclock)
    async with client:
        r = await client.get("/x")
    assert r.text == "hedge" and r.headers["x-riprap-attempts"] == "2"
    assert bad.closed


async def test_hedges_draw_on_the_retry_budget(vclock: VirtualClock) -> None:
    up = Upstream()

    async def slow(_r: httpx.Request) -> httpx.Response:
        await vclock.sleep(0.2)
        return httpx.Response(200)

    up.on(9001, slow)
    up.on(9002, slow)
    rec = Recorder()
    retry = RetrySpec(retries=1, budget=BudgetSpec(ratio=0.0, min_per_second=0.0))
    p = plan(service("api", ports=(9001, 9002), hedge=HedgeSpec(delay=0.05), retry=retry))
    rt, client = make(p, up, vclock, observer=rec)
    async with client:
        r = await client.get("/x")
    assert r.headers["x-riprap-attempts"] == "1"
    assert rec.kinds("hedged") == [] and ("retry_refused", "api", "budget") in rec.events


async def test_post_is_never_hedged(vclock: VirtualClock) -> None:
    up = Upstream()

    async def slow(_r: httpx.Request) -> httpx.Response:
        await vclock.sleep(0.2)
        return httpx.Response(200)

    up.on(9001, slow)
    p = plan(service("api", ports=(9001, 9002), hedge=HedgeSpec(delay=0.05)))
    rt, client = make(p, up, vclock)
    async with client:
        r = await client.post("/x", content=b"x")
    assert r.headers["x-riprap-attempts"] == "1"


async def test_a_cancelled_caller_cancels_every_copy_and_frees_its_slot(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, hang)
    up.on(9002, hang)
    p = plan(service("api", ports=(9001, 9002), timeout=10.0, hedge=HedgeSpec(delay=0.05),
                     concurrency=ConcurrencySpec(max=1), limit=LimitSpec(100, 100)))
    rt, client = make(p, up, vclock)
    async with client:
        call = asyncio.ensure_future(client.get("/x"))
        await vclock.sleep(0.1)  # both copies are in flight
        assert len(up.seen) == 2
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await settle(vclock)
        snap = rt.snapshot()["services"]["api"]
    assert sorted(up.cancelled) == [9001, 9002]
    assert snap["bulkhead"]["in_flight"] == 0
    assert [e["in_flight"] for e in snap["endpoints"]] == [0, 0]


# ------------------------------------------------------------------ fallbacks


async def test_fallback_chain_stale_then_static(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, sequence(status(200, "fresh", {"x-up": "1", "content-type": "text/plain"}),
                         status(503)))
    stale = FallbackSpec("stale", max_age=300.0)
    p = plan(service("api", fallbacks=(stale, STATIC)))
    rt, client = make(p, up, vclock)
    async with client:
        assert (await client.get("/items?page=1")).text == "fresh"
        vclock.advance(60.0)
        r = await client.get("/items?page=1")
        assert (r.status_code, r.text) == (200, "fresh")
        assert r.headers["x-riprap-fallback"] == "stale"
        assert r.headers["x-up"] == "1"
        assert r.headers["x-riprap-reason"] == "upstream-5xx"  # the upstream answered 503: not "no answer"
        r = await client.get("/items?page=2")  # never seen: the static answer
        assert r.headers["x-riprap-fallback"] == "static" and r.status_code == 503
        vclock.advance(300.0)  # too old now
        r = await client.get("/items?page=1")
        assert r.headers["x-riprap-fallback"] == "static"


async def test_stale_cache_captures_a_streamed_body_only_when_complete(vclock: VirtualClock) -> None:
    up = Upstream()
    full = TrackedStream([b"part1-", b"part2"])
    up.on(9001, sequence(lambda _r: httpx.Response(200, stream=full), status(500)))
    p = plan(service("api", fallbacks=(FallbackSpec("stale", max_age=60.0),)))
    rt, client = make(p, up, vclock)
    async with client:
        async with client.stream("GET", "/doc") as r:
            assert await r.aread() == b"part1-part2"
        r = await client.get("/doc")
    assert r.headers["x-riprap-fallback"] == "stale" and r.text == "part1-part2"


async def test_fallback_service_answers_for_a_failed_call(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, status(503))
    p = plan(service("api", retry=RETRY, fallbacks=(FallbackSpec("service", service="backup"),)),
             service("backup", ports=(9002,)))
    rt, client = make(p, up, vclock)
    async with client:
        r = await client.post("/pay", content=b"body", headers={"Idempotency-Key": "1"})
    assert r.status_code == 200 and r.text == "ok from 9002"
    assert r.headers["x-riprap-fallback"] == "service"
    assert r.headers["x-riprap-attempts"] == "3"
    assert up.seen[-1].body == b"body" and up.seen[-1].url == "http://127.0.0.1:9002/pay"


async def test_a_fallback_never_replaces_an_upstream_4xx(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, status(404, "no such item"))
    p = plan(service("api", fallbacks=(FallbackSpec("stale", max_age=60.0), STATIC)))
    rt, client = make(p, up, vclock)
    async with client:
        r = await client.get("/x")
    assert (r.status_code, r.text) == (404, "no such item")
    assert "x-riprap-fallback" not in r.headers


async def test_rate_limited_calls_get_no_fallback(vclock: VirtualClock) -> None:
    up = Upstream()
    p = plan(service("api", fallbacks=(STATIC,), limit=LimitSpec(rate=1, burst=1)))
    rt, client = make(p, up, vclock)
    async with client:
        await client.get("/x")
        r = await client.get("/x")
    assert r.status_code == 429 and "x-riprap-fallback" not in r.headers


# ------------------------------------------------------------------ sharding


def _sharded(by: str, key: str, default: str | None = None) -> object:
    shards = (ShardPlan("a", endpoints=(ep(9001),)), ShardPlan("b", endpoints=(ep(9002),)),
              ShardPlan("c", endpoints=(ep(9003),)))
    return plan(service("inv", sharding=ShardingSpec(by, key, default), shards=shards))


@pytest.mark.parametrize("by,key,request_kw,value", [
    ("header", "X-Sku", {"headers": {"x-sku": "sku-17"}}, "sku-17"),
    ("query", "sku", {"params": {"sku": "sku-17"}}, "sku-17"),
    ("cookie", "tenant", {"headers": {"cookie": "a=1; tenant=acme"}}, "acme"),
    ("path-segment", "2", {}, "sku-17"),
])
async def test_sharding_routes_by_key(vclock: VirtualClock, by: str, key: str,
                                      request_kw: dict, value: str) -> None:
    up = Upstream()
    rt, client = make(_sharded(by, key), up, vclock)  # type: ignore[arg-type]
    expected = {"a": 9001, "b": 9002, "c": 9003}[shard_for(value, ["a", "b", "c"])]
    async with client:
        r = await client.get("http://inv/items/sku-17", **request_kw)
    assert r.status_code == 200 and up.ports() == [expected]


async def test_a_request_without_a_key_goes_to_the_default_shard_or_gets_400(vclock: VirtualClock) -> None:
    up = Upstream()
    rt, client = make(_sharded("header", "x-sku", default="c"), up, vclock)  # type: ignore[arg-type]
    async with client:
        assert (await client.get("http://inv/x")).text == "ok from 9003"
    rt, client = make(_sharded("header", "x-sku"), up, vclock)  # type: ignore[arg-type]
    async with client:
        r = await client.get("http://inv/x")
    assert r.status_code == 400
    assert r.headers["x-riprap-reason"] == "no-shard-key"
    assert r.headers["x-riprap-attempts"] == "0"


# ------------------------------------------------------------------ chaos


async def test_chaos_runs_only_when_enabled(vclock: VirtualClock) -> None:
    up = Upstream()
    p = plan(service("api", chaos=(ChaosSpec("abort", 1.0, status=502),)))
    rt, client = make(p, up, vclock)
    async with client:
        assert (await client.get("/x")).status_code == 200
    rt, client = make(p, up, vclock, chaos=True)
    async with client:
        r = await client.get("/x")
    assert r.status_code == 502 and r.headers["x-riprap-chaos"] == "abort"
    assert len(up.seen) == 1


async def test_chaos_delay_uses_the_clock_and_a_fallback_covers_an_abort(vclock: VirtualClock) -> None:
    up = Upstream()
    p = plan(service("api", chaos=(ChaosSpec("delay", 1.0, delay=0.4),)),
             service("b", ports=(9002,), fallbacks=(STATIC,), chaos=(ChaosSpec("abort", 1.0),)))
    rt, client = make(p, up, vclock, chaos=True)
    async with client:
        t0 = vclock.now()
        assert (await client.get("/x")).status_code == 200
        assert vclock.now() - t0 == pytest.approx(0.4)
        r = await client.get("http://b/x")
    assert r.headers["x-riprap-fallback"] == "static"


# ------------------------------------------------------------------ hot reload


async def test_update_carries_unchanged_state_and_resets_changed_specs(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, status(500))
    breaker = BreakerSpec("consecutive", failures=1, open=30.0)
    api = service("api", ports=(9001, 9002), breaker=breaker,
                  outlier=OutlierSpec(failures=1, max_fraction=0.5))
    other = service("other", ports=(9003,), breaker=breaker)
    rt, client = make(plan(api, other), up, vclock)
    async with client:
        await client.get("/x")  # 9001 fails: breaker opens, 9001 ejected
        up.on(9003, status(500))
        await client.get("http://other/x")
        # api unchanged except its limit; other's breaker spec changes
        await rt.update(plan(dataclasses.replace(api, limit=LimitSpec(100, 100)),
                             dataclasses.replace(other, breaker=dataclasses.replace(breaker, open=5.0))))
        snap = rt.snapshot()["services"]
        assert snap["api"]["breaker"]["state"] == "open"
        assert snap["api"]["endpoints"][0]["ejected"] is True
        assert snap["other"]["breaker"]["state"] == "closed"
        assert rt.plan.services["api"].limit == LimitSpec(100, 100)


async def test_calls_in_flight_finish_on_the_plan_they_started_with(vclock: VirtualClock) -> None:
    up = Upstream()
    release = asyncio.Event()

    async def held(_r: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(200, text="old plan")

    up.on(9001, held)
    rt, client = make(plan(service("api")), up, vclock)
    async with client:
        call = asyncio.ensure_future(client.get("/x"))
        await settle(vclock)
        await rt.update(plan(service("renamed", ports=(9002,))))
        assert rt.service_for_host("api") is None
        release.set()
        r = await call
        assert r.text == "old plan"
        assert (await client.get("/x")).status_code == 404


async def test_update_with_a_bad_plan_keeps_the_running_one(vclock: VirtualClock) -> None:
    up = Upstream()
    rt, client = make(plan(service("api")), up, vclock)
    bad = plan(service("api", order=("retry", "nonsense", "balance")))
    async with client:
        with pytest.raises(ValueError, match="unknown policy 'nonsense'"):
            await rt.update(bad)
        assert rt.plan.services["api"].order != bad.services["api"].order
        assert (await client.get("/x")).status_code == 200


async def test_the_order_in_the_plan_is_the_order_of_the_chain(vclock: VirtualClock) -> None:
    # retry outside timeout: the timeout is per attempt, so a hanging first attempt is
    # cut at 0.2 s and retried (with the default order it would end the whole call).
    up = Upstream()
    up.on(9001, hang)
    order = ("fallback", "limit", "concurrency", "retry", "timeout", "hedge", "breaker",
             "chaos", "balance")
    p = plan(service("api", ports=(9001, 9002), timeout=0.2, order=order,
                     retry=RetrySpec(retries=1, on=("timeout",))))
    rt, client = make(p, up, vclock)
    async with client:
        r = await client.get("/x")
    assert r.text == "ok from 9002" and r.headers["x-riprap-attempts"] == "2"


async def test_when_both_copies_answer_together_the_loser_is_closed(vclock: VirtualClock) -> None:
    up = Upstream()
    streams = {9001: TrackedStream([b"inline"]), 9002: TrackedStream([b"hedge"])}

    def answer_at(t: float, port: int):  # both answers land at exactly t = 0.5
        async def behave(_r: httpx.Request) -> httpx.Response:
            await vclock.sleep(t)
            return httpx.Response(200, stream=streams[port])
        return behave

    up.on(9001, answer_at(0.5, 9001))
    up.on(9002, answer_at(0.25, 9002))
    p = plan(service("api", ports=(9001, 9002), hedge=HedgeSpec(delay=0.25)))
    rt, client = make(p, up, vclock)
    async with client:
        t0 = vclock.now()
        r = await client.get("/x")
        assert vclock.now() - t0 == 0.5
        await settle(vclock)
    winner = 9001 if r.text == "inline" else 9002
    loser = 9002 if winner == 9001 else 9001
    assert streams[winner].closed
    # the loser was cancelled before it answered, or its answer was closed unread
    assert loser in up.cancelled or streams[loser].closed
    assert streams[loser].yielded == 0


async def test_hedging_on_the_real_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The production timer path (SystemClock.call_later: the loop's timer handles), with real waits of 20 ms."""
    from policies.transport import ResilientTransport
    up = Upstream()
    up.on(9001, hang)
    p = plan(service("api", ports=(9001, 9002), timeout=1.0, hedge=HedgeSpec(delay=0.02)))
    async with httpx.AsyncClient(transport=ResilientTransport(p, up.transport())) as client:
        r = await client.get("http://api/x")
    assert r.text == "ok from 9002" and r.headers["x-riprap-attempts"] == "2"
    assert up.cancelled == [9001]


async def test_the_real_clock_deadline_answers_504() -> None:
    from policies.transport import ResilientTransport
    up = Upstream()
    up.on(9001, hang)
    p = plan(service("api", timeout=0.03))
    async with httpx.AsyncClient(transport=ResilientTransport(p, up.transport())) as client:
        r = await client.get("http://api/x")
    assert r.status_code == 504 and r.headers["x-riprap-reason"] == "timeout"
    assert up.cancelled == [9001]


async def test_a_failed_hedge_answer_is_closed_when_the_first_copy_wins(vclock: VirtualClock) -> None:
    up = Upstream()
    bad = TrackedStream([b"hedge failed"])

    async def slow_ok(_r: httpx.Request) -> httpx.Response:
        await vclock.sleep(0.5)
        return httpx.Response(200, text="inline")

    async def fast_500(_r: httpx.Request) -> httpx.Response:
        await vclock.sleep(0.05)
        return httpx.Response(500, stream=bad)

    up.on(9001, slow_ok)
    up.on(9002, fast_500)
    p = plan(service("api", ports=(9001, 9002), hedge=HedgeSpec(delay=0.25)))
    rt, client = make(p, up, vclock)
    async with client:
        r = await client.get("/x")
        await settle(vclock)
    assert r.text == "inline" and r.headers["x-riprap-attempts"] == "2"
    assert bad.closed and bad.yielded == 0
    assert [e["in_flight"] for e in rt.snapshot()["services"]["api"]["endpoints"]] == [0, 0]


async def test_a_big_body_unsent_by_the_failed_call_goes_to_the_fallback_service(
        vclock: VirtualClock) -> None:
    up = Upstream()
    p = plan(service("api", max_body_buffer=4, fallbacks=(FallbackSpec("service", service="backup"),),
                     breaker=BreakerSpec("consecutive", failures=1)),
             service("backup", ports=(9002,)))
    up.on(9001, status(500))

    async def body():
        yield b"0123456789"
        yield b"abcdef"

    rt, client = make(p, up, vclock)
    async with client:
        first = await client.post("/x", content=b"small")  # 500: the breaker opens
        assert first.headers["x-riprap-fallback"] == "service"  # body resent from memory
        r = await client.post("/x", content=body())  # breaker open: never sent to api
    assert r.text == "ok from 9002" and r.headers["x-riprap-fallback"] == "service"
    assert r.headers["x-riprap-reason"] == "breaker-open"
    assert [(s.port, s.body) for s in up.seen] == [
        (9001, b"small"), (9002, b"small"), (9002, b"0123456789abcdef")]


async def test_a_big_body_already_sent_cannot_go_to_the_fallback_service(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, status(500))
    p = plan(service("api", max_body_buffer=4, fallbacks=(FallbackSpec("service", service="backup"),)),
             service("backup", ports=(9002,)))

    async def body():
        yield b"0123456789"

    rt, client = make(p, up, vclock)
    async with client:
        r = await client.post("/x", content=body())
    assert r.status_code == 500 and "x-riprap-fallback" not in r.headers
    assert up.ports() == [9001]


async def test_hedge_max_sends_several_copies_one_delay_apart(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, hang)
    up.on(9002, hang)
    p = plan(service("api", ports=(9001, 9002, 9003), hedge=HedgeSpec(delay=0.05, max_extra=2)))
    rt, client = make(p, up, vclock)
    async with client:
        t0 = vclock.now()
        r = await client.get("/x")
        await settle(vclock)
    assert r.text == "ok from 9003" and r.headers["x-riprap-attempts"] == "3"
    assert vclock.now() - t0 == pytest.approx(0.101)
    assert sorted(up.cancelled) == [9001, 9002]


async def test_an_unexpected_inner_error_stops_the_hedge_timer(vclock: VirtualClock) -> None:
    up = Upstream()

    async def buggy(_r: httpx.Request) -> httpx.Response:
        await vclock.sleep(0.01)
        raise RuntimeError("a bug in the inner transport")

    up.on(9001, buggy)
    p = plan(service("api", ports=(9001, 9002), hedge=HedgeSpec(delay=0.05),
                     concurrency=ConcurrencySpec(max=1)))
    rt, client = make(p, up, vclock)
    async with client:
        with pytest.raises(RuntimeError, match="a bug"):
            await client.get("/x")
        await vclock.sleep(1.0)  # a leaked timer would launch a copy now
        snap = rt.snapshot()["services"]["api"]
    assert up.ports() == [9001]
    assert snap["bulkhead"]["in_flight"] == 0
    assert [e["in_flight"] for e in snap["endpoints"]] == [0, 0]


async def test_cancelled_while_a_slow_loser_winds_down_the_answer_is_not_leaked(
        vclock: VirtualClock) -> None:
    up = Upstream()
    answer = TrackedStream([b"inline"])

    async def inline(_r: httpx.Request) -> httpx.Response:
        await vclock.sleep(0.2)
        return httpx.Response(200, stream=answer)

    async def slow_to_cancel(_r: httpx.Request) -> httpx.Response:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await vclock.sleep(0.5)  # an upstream client that takes its time to let go
            raise
        raise AssertionError("unreachable")

    up.on(9001, inline)
    up.on(9002, slow_to_cancel)
    p = plan(service("api", ports=(9001, 9002), hedge=HedgeSpec(delay=0.1),
                     concurrency=ConcurrencySpec(max=2)))
    rt, client = make(p, up, vclock)
    async with client:
        call = asyncio.ensure_future(client.get("/x"))
        await vclock.sleep(0.3)  # the inline copy answered at 0.2; the loser is winding down
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await vclock.sleep(1.0)
        snap = rt.snapshot()["services"]["api"]
    assert answer.closed
    assert snap["bulkhead"]["in_flight"] == 0
    assert [e["in_flight"] for e in snap["endpoints"]] == [0, 0]


async def test_cancelled_while_the_fallback_service_runs_the_5xx_is_closed(vclock: VirtualClock) -> None:
    up = Upstream()
    failed = TrackedStream([b"upstream error"])
    up.on(9001, lambda _r: httpx.Response(500, stream=failed))
    up.on(9002, hang)
    p = plan(service("api", fallbacks=(FallbackSpec("service", service="backup"),)),
             service("backup", ports=(9002,)))
    rt, client = make(p, up, vclock)
    async with client:
        call = asyncio.ensure_future(client.get("/x"))
        await vclock.sleep(0.1)  # api answered 500; the fallback service hangs
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        snap = rt.snapshot()["services"]
    assert failed.closed
    assert snap["api"]["endpoints"][0]["in_flight"] == 0
    assert snap["backup"]["endpoints"][0]["in_flight"] == 0


async def test_an_endpoint_down_by_health_checks_is_not_used_even_in_panic(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, lambda r: httpx.Response(503 if r.url.path == "/healthz" else 200))
    p = plan(service("api", health=HealthSpec("/healthz", interval=0.1, fall=1, rise=1)))
    rt, client = make(p, up, vclock)
    async with client:
        await rt.start()
        await settle(vclock)
        r = await client.get("/x")
    assert r.status_code == 503 and r.headers["x-riprap-reason"] == "no-healthy-endpoint"
    assert r.headers["x-riprap-attempts"] == "0"
    assert [s.url for s in up.seen] == ["http://127.0.0.1:9001/healthz"]


async def test_panic_prefers_a_lower_tier_that_passes_health_checks(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, lambda r: httpx.Response(503 if r.url.path == "/healthz" else 200))
    up.on(9101, sequence(status(200), raises(httpx.ConnectError), status(200, "failover, ejected")))
    p = plan(service("api", endpoints=(ep(9001), ep(9101, tier=1)),
                     health=HealthSpec("/healthz", interval=10.0, fall=1, rise=1),
                     outlier=OutlierSpec(failures=1, max_fraction=1.0)))
    rt, client = make(p, up, vclock)
    async with client:
        await rt.start()
        await settle(vclock)  # 9001 down by its check, 9101 up (its check answered 200)
        assert (await client.get("/x")).status_code == 502  # 9101 refuses: ejected
        r = await client.get("/x")  # nothing usable: panic picks 9101 (up, only ejected)
    assert r.text == "failover, ejected"


async def test_a_retry_moves_to_the_failover_tier_when_every_primary_failed_the_call(
        vclock: VirtualClock) -> None:
    # no health checks, no outlier ejection, no breaker: the refused primary is "broken"
    # for this call, so its retry goes to the backup tier (section 5: failover)
    up = Upstream()
    up.on(9001, raises(httpx.ConnectError))
    p = plan(service("api", endpoints=(ep(9001), ep(9101, tier=1)),
                     retry=RetrySpec(retries=2, on=("connect-failure",))))
    rt, client = make(p, up, vclock)
    async with client:
        r = await client.get("/x")
        assert (r.status_code, r.text) == (200, "ok from 9101")
        assert r.headers["x-riprap-attempts"] == "2"
        r = await client.get("/x")  # a new call starts again from the primaries
    assert r.text == "ok from 9101"
    assert up.ports() == [9001, 9101, 9001, 9101]


async def test_when_every_endpoint_failed_the_call_a_retry_tries_the_primaries_again(
        vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, status(503))
    up.on(9101, status(503))
    p = plan(service("api", endpoints=(ep(9001), ep(9101, tier=1)),
                     retry=RetrySpec(retries=2, on=("5xx",))))
    rt, client = make(p, up, vclock)
    async with client:
        r = await client.get("/x")
    # both tiers failed this call: the third attempt goes back to the primary (its 2nd 503)
    assert up.ports() == [9001, 9101, 9001]
    assert r.status_code == 503 and r.headers["x-riprap-attempts"] == "3"
