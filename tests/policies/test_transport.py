"""ResilientTransport over in-memory upstreams: routing, retries, deadlines, answers.

Every test runs on a `VirtualClock` (timers race in virtual time, no real sleeping) and
a seeded random source; upstreams are `httpx.MockTransport` handlers.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from dsl.plan import BackoffSpec, BudgetSpec, LimitSpec, ConcurrencySpec, RetrySpec
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

RETRY_5XX = RetrySpec(retries=2, on=("connect-failure", "reset", "5xx"))


# ------------------------------------------------------------------ routing and forwarding


async def test_forwards_path_query_body_and_sets_host_and_deadline(vclock: VirtualClock) -> None:
    up = Upstream()
    p = plan(service("api", endpoints=(ep(9001).__class__("http://127.0.0.1:9001/base/"),),
                     timeout=2.0))
    rt, client = make(p, up, vclock)
    async with client:
        r = await client.put("http://api/v1/items?id=7&x=%20", content=b"payload",
                             headers={"x-custom": "1", "connection": "keep-alive, x-hop",
                                      "x-hop": "dropped"})
    assert r.status_code == 200 and r.text == "ok from 9001"
    assert r.headers["x-riprap-attempts"] == "1"
    assert "x-riprap-reason" not in r.headers
    seen = up.seen[0]
    assert seen.url == "http://127.0.0.1:9001/base/v1/items?id=7&x=%20"
    assert seen.headers["host"] == "127.0.0.1:9001"
    assert seen.headers["x-custom"] == "1"
    assert "x-hop" not in seen.headers and "connection" not in seen.headers
    assert seen.body == b"payload" and seen.headers["content-length"] == "7"
    assert seen.headers["x-riprap-deadline-ms"] == "2000"


async def test_service_by_host_alias_case_and_port(vclock: VirtualClock) -> None:
    up = Upstream()
    rt, client = make(plan(service("api", hosts=("api.internal",)), service("other", ports=(9002,))),
                      up, vclock)
    async with client:
        assert rt.service_for_host("API.Internal:8080") == "api"
        assert rt.service_for_host("other") == "other"
        assert rt.service_for_host("nope") is None
        r = await client.get("http://API.INTERNAL:1234/x")
        assert r.text == "ok from 9001"
        # the sidecar routes itself: the extension wins over the host
        r = await client.get("http://api/x", extensions={"riprap.service": "other"})
        assert r.text == "ok from 9002"


async def test_unknown_service_is_404_json_with_the_known_services(vclock: VirtualClock) -> None:
    up = Upstream()
    rt, client = make(plan(service("b-svc"), service("a-svc", ports=(9002,))), up, vclock)
    async with client:
        r = await client.get("http://elsewhere.example/x")
    assert r.status_code == 404
    assert r.headers["x-riprap-reason"] == "unknown-service"
    assert r.headers["x-riprap-attempts"] == "0"
    assert r.json() == {"error": "unknown service 'elsewhere.example'",
                        "services": ["a-svc", "b-svc"]}
    assert up.seen == []


# ------------------------------------------------------------------ retries


async def test_retries_a_503_on_another_endpoint_with_backoff(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, status(503))
    rec = Recorder()
    p = plan(service("api", ports=(9001, 9002), retry=RetrySpec(
        retries=2, on=("503",), backoff=BackoffSpec("constant", 0.25, 0.25, jitter="none"))))
    rt, client = make(p, up, vclock, observer=rec)
    async with client:
        r = await client.get("/x")
    assert r.status_code == 200 and r.text == "ok from 9002"
    assert r.headers["x-riprap-attempts"] == "2"
    assert up.ports() == [9001, 9002]
    assert 0.25 in vclock.slept
    assert rec.kinds("retried") == [("retried", "api")]
    assert rec.kinds("call") == [("call", "api", "ok", 200, 2, None)]


async def test_a_5xx_that_survives_retries_passes_through_as_sent(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, status(503, "upstream says no", {"x-up": "1"}))
    rt, client = make(plan(service("api", retry=RETRY_5XX)), up, vclock)
    async with client:
        r = await client.get("/x")
    assert r.status_code == 503 and r.text == "upstream says no"
    assert r.headers["x-up"] == "1"
    assert r.headers["x-riprap-attempts"] == "3"
    assert "x-riprap-reason" not in r.headers


async def test_a_reset_and_a_refusal_become_502_upstream_failed(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, raises(httpx.ReadError))
    up.on(9002, raises(httpx.ConnectError))
    rt, client = make(plan(service("api", ports=(9001, 9002), retry=RETRY_5XX)), up, vclock)
    async with client:
        r = await client.get("/x")
    assert r.status_code == 502
    assert r.headers["x-riprap-reason"] == "upstream-failed"
    assert r.headers["x-riprap-attempts"] == "3"
    assert r.json()["reason"] == "upstream-failed"


async def test_post_is_not_retried_on_5xx_or_reset(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, status(503))
    up.on(9002, raises(httpx.RemoteProtocolError))
    rec = Recorder()
    rt, client = make(plan(service("api", retry=RETRY_5XX), service("b", ports=(9002,), retry=RETRY_5XX)),
                      up, vclock, observer=rec)
    async with client:
        r = await client.post("http://api/x", content=b"charge")
        assert (r.status_code, r.headers["x-riprap-attempts"]) == (503, "1")
        r = await client.post("http://b/x", content=b"charge")
        assert (r.status_code, r.headers["x-riprap-attempts"]) == (502, "1")
    assert up.ports() == [9001, 9002]
    assert rec.kinds("retry_refused") == [("retry_refused", "api", "method"),
                                          ("retry_refused", "b", "method")]


async def test_post_is_retried_after_a_connect_failure(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, raises(httpx.ConnectError))
    rt, client = make(plan(service("api", ports=(9001, 9002), retry=RETRY_5XX)), up, vclock)
    async with client:
        r = await client.post("/x", content=b"charge")
    assert r.status_code == 200 and r.headers["x-riprap-attempts"] == "2"
    assert [s.body for s in up.seen] == [b"charge", b"charge"]


async def test_post_with_idempotency_key_is_retried_with_the_same_body(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, status(503))
    rt, client = make(plan(service("api", ports=(9001, 9002), retry=RETRY_5XX)), up, vclock)

    async def body():  # a streamed request body: read once, replayed from the buffer
        yield b"char"
        yield b"ge"

    async with client:
        r = await client.post("/x", content=body(), headers={"Idempotency-Key": "k1"})
    assert r.status_code == 200 and r.headers["x-riprap-attempts"] == "2"
    assert [s.body for s in up.seen] == [b"charge", b"charge"]


async def test_methods_override_makes_post_retryable(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, status(502))
    up.on(9002, status(502))
    retry = RetrySpec(retries=1, on=("502",), methods=("POST",))
    rt, client = make(plan(service("api", ports=(9001, 9002), retry=retry)), up, vclock)
    async with client:
        r = await client.post("/x", content=b"x")
        assert r.headers["x-riprap-attempts"] == "2"
        r = await client.get("/x")  # GET is no longer in `methods`: not retried
        assert (r.status_code, r.headers["x-riprap-attempts"]) == (502, "1")
    assert len(up.seen) == 3


async def test_a_body_over_the_bound_is_streamed_once_and_not_retried(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, status(503))
    rec = Recorder()
    p = plan(service("api", ports=(9001, 9002), retry=RETRY_5XX, max_body_buffer=8))

    async def body():
        for _ in range(4):
            yield b"0123456789"

    rt, client = make(p, up, vclock, observer=rec)
    async with client:
        r = await client.put("/x", content=body(), headers={"content-length": "40"})
    assert r.status_code == 503 and r.headers["x-riprap-attempts"] == "1"
    assert [s.body for s in up.seen] == [b"0123456789" * 4]
    assert up.seen[0].headers["content-length"] == "40"
    assert ("retry_refused", "api", "body") in rec.events


async def test_retry_after_is_honoured_within_the_deadline(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, sequence(status(503, headers={"retry-after": "2"}), status(200)))
    p = plan(service("api", timeout=5.0, retry=RetrySpec(retries=1, on=("503",))))
    rt, client = make(p, up, vclock)
    async with client:
        t0 = vclock.now()
        r = await client.get("/x")
    assert r.status_code == 200 and r.headers["x-riprap-attempts"] == "2"
    assert vclock.now() - t0 == pytest.approx(2.0)


async def test_retry_after_beyond_the_deadline_passes_the_answer_on(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, status(503, headers={"retry-after": "60"}))
    rec = Recorder()
    p = plan(service("api", timeout=5.0, retry=RetrySpec(retries=3, on=("503",))))
    rt, client = make(p, up, vclock, observer=rec)
    async with client:
        t0 = vclock.now()
        r = await client.get("/x")
    assert r.status_code == 503 and r.headers["retry-after"] == "60"
    assert r.headers["x-riprap-attempts"] == "1"
    assert vclock.now() == t0
    assert ("retry_refused", "api", "deadline") in rec.events


async def test_per_try_timeout_moves_on_to_another_endpoint(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, hang)
    retry = RetrySpec(retries=1, on=("timeout",), per_try_timeout=0.1)
    rt, client = make(plan(service("api", ports=(9001, 9002), timeout=2.0, retry=retry)), up, vclock)
    async with client:
        t0 = vclock.now()
        r = await client.get("/x")
    assert r.status_code == 200 and r.text == "ok from 9002"
    assert vclock.now() - t0 == pytest.approx(0.1)
    assert up.cancelled == [9001]


async def test_per_try_timeouts_exhausted_answer_504(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, hang)
    retry = RetrySpec(retries=1, on=("timeout",), per_try_timeout=0.1)
    rt, client = make(plan(service("api", timeout=2.0, retry=retry)), up, vclock)
    async with client:
        r = await client.get("/x")
    assert r.status_code == 504 and r.headers["x-riprap-reason"] == "timeout"
    assert r.headers["x-riprap-attempts"] == "2"


# ------------------------------------------------------------------ deadlines


async def test_the_timeout_cuts_a_hanging_call_at_the_deadline(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, hang)
    rt, client = make(plan(service("api", timeout=0.3)), up, vclock)
    async with client:
        t0 = vclock.now()
        r = await client.get("/x")
    assert r.status_code == 504
    assert r.headers["x-riprap-reason"] == "timeout"
    assert r.headers["x-riprap-attempts"] == "1"
    assert vclock.now() - t0 == pytest.approx(0.3)
    assert up.cancelled == [9001]


async def test_incoming_deadline_header_caps_the_timeout(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, hang)
    rt, client = make(plan(service("api", timeout=5.0)), up, vclock)
    async with client:
        t0 = vclock.now()
        r = await client.get("/x", headers={"x-riprap-deadline-ms": "250"})
    assert r.status_code == 504
    assert vclock.now() - t0 == pytest.approx(0.25)
    assert up.seen[0].headers["x-riprap-deadline-ms"] == "250"


async def test_an_expired_incoming_deadline_answers_504_without_an_attempt(vclock: VirtualClock) -> None:
    up = Upstream()
    rt, client = make(plan(service("api")), up, vclock)
    async with client:
        r = await client.get("/x", headers={"x-riprap-deadline-ms": "0"})
    assert (r.status_code, r.headers["x-riprap-attempts"]) == (504, "0")
    assert up.seen == []


async def test_the_deadline_cuts_retries_when_less_than_the_median_is_left(vclock: VirtualClock) -> None:
    up = Upstream()

    async def slow_503(_r: httpx.Request) -> httpx.Response:
        await vclock.sleep(0.4)
        return httpx.Response(503)

    up.on(9001, slow_503)
    rec = Recorder()
    retry = RetrySpec(retries=5, on=("503",), backoff=BackoffSpec("constant", 0.05, 0.05, jitter="none"))
    rt, client = make(plan(service("api", timeout=1.0, retry=retry)), up, vclock, observer=rec)
    async with client:
        t0 = vclock.now()
        r = await client.get("/x")
    # attempt 1 ends at 0.40, retry after 0.05 ends at 0.85; 0.15 left < median 0.4: stop
    assert r.status_code == 504 and r.headers["x-riprap-reason"] == "timeout"
    assert r.headers["x-riprap-attempts"] == "2"
    assert vclock.now() - t0 == pytest.approx(0.85)
    assert ("retry_refused", "api", "deadline") in rec.events


async def test_each_attempt_is_sent_the_time_left(vclock: VirtualClock) -> None:
    up = Upstream()

    async def slow_503(_r: httpx.Request) -> httpx.Response:
        await vclock.sleep(0.3)
        return httpx.Response(503)

    up.on(9001, sequence(slow_503, status(200)))
    rt, client = make(plan(service("api", timeout=2.0, retry=RetrySpec(retries=1, on=("503",)))),
                      up, vclock)
    async with client:
        r = await client.get("/x")
    assert r.status_code == 200
    assert [s.headers["x-riprap-deadline-ms"] for s in up.seen] == ["2000", "1700"]


# ------------------------------------------------------------------ limit and concurrency


async def test_over_the_limit_answers_429_with_retry_after(vclock: VirtualClock) -> None:
    up = Upstream()
    rec = Recorder()
    rt, client = make(plan(service("api", limit=LimitSpec(rate=0.5, burst=1))), up, vclock,
                      observer=rec)
    async with client:
        assert (await client.get("/x")).status_code == 200
        r = await client.get("/x")
        assert r.status_code == 429
        assert r.headers["x-riprap-reason"] == "rate-limited"
        assert r.headers["retry-after"] == "2"
        assert r.headers["x-riprap-attempts"] == "0"
        vclock.advance(2.0)
        assert (await client.get("/x")).status_code == 200
    assert len(up.seen) == 2
    assert rec.kinds("rejected") == [("rejected", "api", "limit")]


async def test_limit_per_header_keeps_one_bucket_per_value(vclock: VirtualClock) -> None:
    up = Upstream()
    p = plan(service("api", limit=LimitSpec(rate=1, burst=1, per_header="x-tenant")))
    rt, client = make(p, up, vclock)
    async with client:
        a1 = await client.get("/x", headers={"x-tenant": "a"})
        b1 = await client.get("/x", headers={"x-tenant": "b"})
        a2 = await client.get("/x", headers={"x-tenant": "a"})
    assert (a1.status_code, b1.status_code, a2.status_code) == (200, 200, 429)


async def test_concurrency_cap_answers_503_overloaded_until_the_body_is_closed(
        vclock: VirtualClock) -> None:
    up = Upstream()
    stream = TrackedStream([b"a", b"b"], gate=asyncio.Event())
    up.on(9001, sequence(lambda _r: httpx.Response(200, stream=stream), status(200)))
    rec = Recorder()
    rt, client = make(plan(service("api", concurrency=ConcurrencySpec(max=1))), up, vclock,
                      observer=rec)
    async with client:
        async with client.stream("GET", "/slow") as held:
            assert held.status_code == 200
            r = await client.get("/x")
            assert r.status_code == 503
            assert r.headers["x-riprap-reason"] == "overloaded"
            assert r.headers["x-riprap-attempts"] == "0"
            assert rt.snapshot()["services"]["api"]["bulkhead"]["in_flight"] == 1
        assert stream.closed
        assert rt.snapshot()["services"]["api"]["bulkhead"]["in_flight"] == 0
        assert (await client.get("/x")).status_code == 200
    assert rec.kinds("rejected") == [("rejected", "api", "concurrency")]


async def test_concurrency_queue_times_out_into_overloaded(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, hang)
    p = plan(service("api", timeout=10.0,
                     concurrency=ConcurrencySpec(max=1, queue=1, queue_timeout=0.5)))
    rt, client = make(p, up, vclock)
    async with client:
        first = asyncio.ensure_future(client.get("/hang"))
        await asyncio.sleep(0)
        t0 = vclock.now()
        r = await client.get("/x")
        assert r.status_code == 503 and r.headers["x-riprap-reason"] == "overloaded"
        assert vclock.now() - t0 == pytest.approx(0.5)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert rt.snapshot()["services"]["api"]["bulkhead"]["in_flight"] == 0


# ------------------------------------------------------------------ budget


async def test_the_budget_caps_retry_amplification(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, status(503))
    rec = Recorder()
    retry = RetrySpec(retries=3, on=("503",), budget=BudgetSpec(ratio=0.2, min_per_second=0.0))
    rt, client = make(plan(service("api", retry=retry)), up, vclock, observer=rec)
    async with client:
        for _ in range(100):
            r = await client.get("/x")
            assert r.status_code == 503
    # without the budget: 400 attempts; with it: 100 calls + at most 20 % retries
    assert 100 < len(up.seen) <= 120
    assert len(rec.kinds("retry_refused")) >= 80


# ------------------------------------------------------------------ streaming


async def test_the_winning_response_streams_unbuffered(vclock: VirtualClock) -> None:
    up = Upstream()
    gate = asyncio.Event()
    stream = TrackedStream([b"first ", b"second"], gate=gate)
    up.on(9001, lambda _r: httpx.Response(200, stream=stream, headers={"content-type": "text/event-stream"}))
    rt, client = make(plan(service("api", retry=RETRY_5XX)), up, vclock)
    async with client:
        async with client.stream("GET", "/events") as r:
            it = r.aiter_raw()
            assert await it.__anext__() == b"first "
            assert stream.yielded == 1  # the second chunk does not exist yet: nothing buffered
            gate.set()
            assert await it.__anext__() == b"second"
        assert stream.closed
    ep_state = rt.snapshot()["services"]["api"]["endpoints"][0]
    assert ep_state["in_flight"] == 0


async def test_discarded_retried_responses_are_closed(vclock: VirtualClock) -> None:
    up = Upstream()
    bad = TrackedStream([b"bad"])
    up.on(9001, sequence(lambda _r: httpx.Response(503, stream=bad), status(200)))
    rt, client = make(plan(service("api", retry=RETRY_5XX)), up, vclock)
    async with client:
        r = await client.get("/x")
    assert r.status_code == 200
    assert bad.closed


# ------------------------------------------------------------------ the observer


async def test_a_failing_observer_never_breaks_a_call(vclock: VirtualClock) -> None:
    class Broken(Recorder):
        def call_finished(self, *a: object) -> None:
            raise RuntimeError("metrics down")

        def attempt_finished(self, *a: object) -> None:
            raise RuntimeError("metrics down")

    up = Upstream()
    rt, client = make(plan(service("api")), up, vclock, observer=Broken())
    async with client:
        r = await client.get("/x")
    assert r.status_code == 200


async def test_snapshot_is_json(vclock: VirtualClock) -> None:
    from dsl.plan import BreakerSpec, OutlierSpec
    up = Upstream()
    p = plan(service("api", ports=(9001, 9002), limit=LimitSpec(10, 10),
                     concurrency=ConcurrencySpec(4), outlier=OutlierSpec(3),
                     breaker=BreakerSpec("consecutive", failures=3),
                     retry=RetrySpec(2, budget=BudgetSpec(0.2))))
    rt, client = make(p, up, vclock)
    async with client:
        await client.get("/x")
        snap = json.loads(json.dumps(rt.snapshot()))
    svc = snap["services"]["api"]
    assert svc["breaker"]["state"] == "closed"
    assert svc["limiter"]["rate"] == 10
    assert svc["bulkhead"]["max"] == 4
    assert svc["budget"]["calls"] == 1
    assert [e["url"] for e in svc["endpoints"]] == ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
    assert svc["endpoints"][0]["healthy"] is True


async def test_an_incoming_deadline_cuts_retries_too(vclock: VirtualClock) -> None:
    up = Upstream()

    async def slow_503(_r: httpx.Request) -> httpx.Response:
        await vclock.sleep(0.3)
        return httpx.Response(503)

    up.on(9001, slow_503)
    retry = RetrySpec(retries=5, on=("503",))
    rt, client = make(plan(service("api", timeout=5.0, retry=retry)), up, vclock)
    async with client:
        t0 = vclock.now()
        r = await client.get("/x", headers={"x-riprap-deadline-ms": "500"})
    # 0.3 s spent, 0.2 s left < median 0.3 s: no second attempt, 504 at once
    assert (r.status_code, r.headers["x-riprap-attempts"]) == (504, "1")
    assert vclock.now() - t0 == pytest.approx(0.3)


async def test_attempt_outcomes_reported_to_the_observer(vclock: VirtualClock) -> None:
    up = Upstream()
    up.on(9001, sequence(status(503), raises(httpx.ConnectError), raises(httpx.ReadError),
                         raises(httpx.LocalProtocolError)))
    rec = Recorder()
    retry = RetrySpec(retries=3, on=("connect-failure", "reset", "5xx"))
    rt, client = make(plan(service("api", retry=retry)), up, vclock, observer=rec)
    async with client:
        r = await client.get("/x")
    # a request that cannot be written is not retried: 502 after the fourth attempt
    assert (r.status_code, r.headers["x-riprap-attempts"]) == (502, "4")
    assert [e[3] for e in rec.kinds("attempt")] == [
        "5xx", "connect-failure", "reset", "invalid-request"]
    assert rec.kinds("call") == [("call", "api", "upstream-failed", 502, 4, None)]


async def test_a_body_streams_unread_when_nothing_could_resend_it(vclock: VirtualClock) -> None:
    gate = asyncio.Event()
    sent_first: list[bool] = []

    async def slow_body():
        yield b"first,"
        await gate.wait()
        yield b"last"

    async def early(request: httpx.Request) -> httpx.Response:
        # the upstream sees the call before the client has finished its body
        stream = request.stream
        it = stream.__aiter__()  # type: ignore[union-attr]
        sent_first.append(await it.__anext__() == b"first,")
        gate.set()
        rest = [c async for c in it]
        return httpx.Response(200, text=f"{len(rest)} more")

    class Direct(httpx.AsyncBaseTransport):  # MockTransport reads the body first: not this
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            return await early(request)

    from policies.transport import ResilientTransport
    rt = ResilientTransport(plan(service("api")), Direct(), clock=vclock)
    client = httpx.AsyncClient(transport=rt, base_url="http://api")
    async with client:
        r = await client.post("/x", content=slow_body())
    assert r.text == "1 more" and sent_first == [True]


def test_a_missing_plan_is_a_clear_type_error() -> None:
    from policies.transport import ResilientTransport

    with pytest.raises(TypeError, match="needs a compiled dsl.plan.Plan, not NoneType"):
        ResilientTransport(None)  # type: ignore[arg-type]  # compile_file(bad).plan
