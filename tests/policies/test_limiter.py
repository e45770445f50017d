import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsl.plan import LimitSpec
from policies.clock import FakeClock
from policies.limiter import KeyedLimiter, TokenBucket, retry_after_seconds


def test_bucket_starts_full_and_reports_the_wait(clock):
    b = TokenBucket(rate=10.0, burst=3.0, clock=clock)
    assert [b.try_take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.try_take() == pytest.approx(0.1)  # one token takes 1/rate
    clock.advance(0.04)
    assert b.try_take() == pytest.approx(0.06)  # the wait shrinks as tokens drip in
    clock.advance(0.06)
    assert b.try_take() == 0.0
    assert b.try_take() == pytest.approx(0.1)


def test_refill_is_continuous_and_capped_at_burst(clock):
    b = TokenBucket(rate=2.0, burst=4.0, clock=clock)
    for _ in range(4):
        b.try_take()
    clock.advance(0.5)
    assert b.tokens == pytest.approx(1.0)
    assert b.try_take() == 0.0
    assert b.try_take() > 0
    clock.advance(3600.0)
    assert b.tokens == 4.0  # never above burst after a long idle
    assert sum(1 for _ in range(10) if b.try_take() == 0.0) == 4


def test_sustained_rate_matches_the_limit(clock):
    b = TokenBucket(rate=100.0, burst=10.0, clock=clock)
    taken = 0
    for _ in range(10_000):  # 10 s at 1000 attempts/s
        if b.try_take() == 0.0:
            taken += 1
        clock.advance(0.001)
    assert 1000 <= taken <= 1010  # the rate over 10 s, plus the initial burst


def test_a_refused_take_takes_nothing(clock):
    b = TokenBucket(rate=1.0, burst=1.0, clock=clock)
    assert b.try_take() == 0.0
    for _ in range(5):
        assert b.try_take() == pytest.approx(1.0)
    clock.advance(1.0)
    assert b.try_take() == 0.0


def test_a_burst_below_one_still_holds_one_token(clock):
    b = TokenBucket(rate=0.5, burst=0.5, clock=clock)
    assert b.try_take() == 0.0
    assert b.try_take() == pytest.approx(2.0)


def test_bad_buckets(clock):
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(0.0, 1.0, clock)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(1.0, 0.0, clock)


def test_keyed_limiter_without_a_header_has_one_bucket(clock):
    lim = KeyedLimiter(LimitSpec(rate=1.0, burst=2.0), clock)
    assert lim.try_take("a") == 0.0
    assert lim.try_take("b") == 0.0
    assert lim.try_take(None) == pytest.approx(1.0)
    assert len(lim) == 1
    assert lim.snapshot() == {"rate": 1.0, "burst": 2.0, "limited": 1, "tokens": 0.0}


def test_keyed_limiter_keeps_one_bucket_per_key(clock):
    lim = KeyedLimiter(LimitSpec(rate=1.0, burst=1.0, per_header="X-Tenant"), clock)
    assert lim.try_take("a") == 0.0
    assert lim.try_take("a") == pytest.approx(1.0)
    assert lim.try_take("b") == 0.0  # another tenant has its own bucket
    assert lim.try_take(None) == 0.0  # requests without the header share one
    assert lim.try_take(None) > 0
    assert lim.snapshot()["keys"] == 3


def test_per_key_buckets_are_bounded_lru(clock):
    lim = KeyedLimiter(LimitSpec(rate=1.0, burst=1.0, per_header="X-Tenant", max_keys=100), clock)
    assert lim.try_take("hot") == 0.0
    for i in range(10_000):
        lim.try_take(f"k{i}")
        if i % 50 == 0:
            assert lim.try_take("hot") > 0  # kept warm: never evicted, still empty
        assert len(lim) <= 100
    assert len(lim) == 100
    assert lim.try_take("k0") == 0.0  # evicted long ago: comes back with a full bucket


def test_memory_does_not_grow_with_keys(clock):
    lim = KeyedLimiter(LimitSpec(rate=1.0, burst=1.0, per_header="X-Tenant", max_keys=64), clock)
    for i in range(1000):
        lim.try_take(f"a{i}")
    size_after_1k = sys.getsizeof(lim._buckets)
    for i in range(50_000):
        lim.try_take(f"b{i}")
    assert len(lim) == 64
    assert sys.getsizeof(lim._buckets) <= size_after_1k


def test_bad_limit_spec(clock):
    with pytest.raises(ValueError, match="max_keys"):
        KeyedLimiter(LimitSpec(rate=1.0, burst=1.0, per_header="X", max_keys=0), clock)


@pytest.mark.parametrize("wait,header", [(0.001, 1), (1.0, 1), (1.2, 2), (2.0, 2), (59.5, 60)])
def test_retry_after_rounds_up_to_whole_seconds(wait, header):
    assert retry_after_seconds(wait) == header


@settings(max_examples=100, deadline=None, database=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 3.0, 50.0]),
    burst=st.sampled_from([1.0, 2.0, 10.0]),
    gaps=st.lists(st.floats(0.0, 2.0, allow_nan=False), min_size=1, max_size=80),
)
def test_never_more_than_burst_plus_rate_times_elapsed(rate, burst, gaps):
    clock = FakeClock(0.0)
    b = TokenBucket(rate, burst, clock)
    taken = 0
    for gap in gaps:
        clock.advance(gap)
        wait = b.try_take()
        if wait == 0.0:
            taken += 1
        else:
            # the reported wait is exact: waiting it yields a token, a bit less does not
            assert wait <= 1.0 / rate + 1e-9
    assert taken <= burst + rate * clock.now() + 1e-6


def test_long_keys_are_kept_as_fixed_size_digests_so_memory_is_bounded_in_bytes(clock):
    lim = KeyedLimiter(LimitSpec(rate=1.0, burst=1.0, per_header="X-User"), clock)
    long_a, long_b = "a" * 100_000, "a" * 99_999 + "b"
    assert lim.try_take(long_a) == 0.0
    assert lim.try_take(long_a) > 0  # the same long value: the same bucket
    assert lim.try_take(long_b) == 0.0  # another long value: its own bucket
    assert lim.try_take("a" * 64) == 0.0 and lim.try_take("a" * 64) > 0  # short: as it is
    assert all(k is None or len(k) <= 64 for k in lim._buckets)


async def test_400_distinct_1mib_header_values_do_not_hold_400_mib() -> None:
    """Issue 10 item 10, through the engine: the per-header limiter keeps each value's
    digest, not the value."""
    import gc
    import tracemalloc

    import httpx

    from dsl.plan import EndpointSpec, Plan, ServicePlan
    from policies.transport import ResilientTransport

    spec = ServicePlan(name="api", endpoints=(EndpointSpec("http://127.0.0.1:9"),),
                       limit=LimitSpec(rate=1000.0, burst=1000.0, per_header="X-User"))
    rt = ResilientTransport(Plan(services={"api": spec}),
                            httpx.MockTransport(lambda r: httpx.Response(200)))
    mib = 1024 * 1024
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(400):
            value = f"{i:04d}" + "u" * (mib - 4)
            resp = await rt.handle_async_request(
                httpx.Request("GET", "http://api/", headers={"X-User": value}))
            assert resp.status_code == 200
            del value, resp
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
        await rt.aclose()
    assert rt.snapshot()["services"]["api"]["limiter"]["keys"] == 400
    assert held < 8 * mib, f"{held / mib:.0f} MiB held"
