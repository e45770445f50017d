import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsl.plan import BudgetSpec
from policies.budget import RetryBudget
from policies.clock import FakeClock


def spend_all(b: RetryBudget, limit: int = 10_000) -> int:
    n = 0
    while n < limit and b.try_spend():
        n += 1
    return n


def test_ratio_caps_retries(clock):
    b = RetryBudget(BudgetSpec(ratio=0.2, min_per_second=0.0), clock)
    for _ in range(10):
        b.record_call()
    assert spend_all(b) == 2
    assert b.refused == 1
    for _ in range(5):
        b.record_call()
    assert spend_all(b) == 1  # 15 calls allow 3


def test_minimum_rate_allows_retries_on_a_quiet_service(clock):
    b = RetryBudget(BudgetSpec(ratio=0.2, min_per_second=1.0, window=10.0), clock)
    assert spend_all(b) == 10  # 1/s over a 10 s window, with no calls at all


def test_the_larger_of_ratio_and_floor_applies(clock):
    b = RetryBudget(BudgetSpec(ratio=0.5, min_per_second=0.5, window=10.0), clock)
    for _ in range(20):
        b.record_call()
    assert spend_all(b) == 10  # 50% of 20 == floor 5; then 10 > 5
    for _ in range(20):
        b.record_call()
    assert spend_all(b) == 10  # 50% of 40 = 20


def test_budget_runs_dry_and_refills_as_the_window_slides(clock):
    b = RetryBudget(BudgetSpec(ratio=0.1, min_per_second=0.0, window=10.0), clock)
    for _ in range(100):
        b.record_call()
    assert spend_all(b) == 10
    assert not b.try_spend()  # dry
    clock.advance(9.5)  # still within the same 10 one-second buckets
    assert not b.try_spend()
    for _ in range(10):
        b.record_call()
    assert spend_all(b) == 1  # 110 calls allow 11
    clock.advance(0.5)  # t = 1010: the first bucket (100 calls, 10 retries) leaves
    assert b.calls == 10 and b.retries == 1
    assert not b.try_spend()  # 10 calls allow 1, which is spent
    clock.advance(10.0)  # everything leaves
    assert b.calls == 0 and b.retries == 0
    for _ in range(30):
        b.record_call()
    assert spend_all(b) == 3


def test_long_idle_clears_every_bucket(clock):
    b = RetryBudget(BudgetSpec(ratio=1.0, min_per_second=0.0), clock)
    for _ in range(5):
        b.record_call()
    clock.advance(1e6)
    assert b.snapshot()["calls"] == 0
    assert not b.try_spend()


def test_zero_ratio_and_floor_refuses_everything(clock):
    b = RetryBudget(BudgetSpec(ratio=0.0, min_per_second=0.0), clock)
    for _ in range(1000):
        b.record_call()
    assert not b.try_spend()


def test_snapshot(clock):
    b = RetryBudget(BudgetSpec(ratio=0.2, min_per_second=0.1, window=10.0), clock)
    for _ in range(20):
        b.record_call()
    b.try_spend()
    assert b.snapshot() == {
        "ratio": 0.2, "min_per_second": 0.1, "window": 10.0,
        "calls": 20, "retries": 1, "allowed": 4.0, "refused": 0,
    }


def test_bad_specs(clock):
    with pytest.raises(ValueError, match="window"):
        RetryBudget(BudgetSpec(ratio=0.2, window=0.0), clock)
    with pytest.raises(ValueError, match="ratio"):
        RetryBudget(BudgetSpec(ratio=-0.1), clock)


ops = st.lists(
    st.one_of(
        st.just(("call", 0.0)),
        st.just(("spend", 0.0)),
        st.tuples(st.just("wait"), st.sampled_from([0.25, 0.5, 1.0, 3.0, 9.5, 11.0])),
    ),
    max_size=120,
)


@settings(max_examples=120, deadline=None, database=None)
@given(ops=ops, ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]), floor=st.sampled_from([0.0, 0.1, 0.3]))
def test_matches_an_event_list_model(ops, ratio, floor):
    """Against a brute-force model: events with timestamps, counted per 1 s bucket."""
    clock = FakeClock(0.0)
    b = RetryBudget(BudgetSpec(ratio=ratio, min_per_second=floor, window=10.0), clock)
    events: list[tuple[int, str]] = []
    for op, arg in ops:
        if op == "wait":
            clock.advance(arg)
            continue
        slot = int(clock.now() // 1.0)
        live = [kind for s, kind in events if s > slot - 10]
        calls, retries = live.count("call"), live.count("retry")
        if op == "call":
            b.record_call()
            events.append((slot, "call"))
        else:
            allowed = retries + 1 <= max(ratio * calls, floor * 10.0) + 1e-9
            assert b.try_spend() is allowed
            if allowed:
                events.append((slot, "retry"))
    slot = int(clock.now() // 1.0)
    live = [kind for s, kind in events if s > slot - 10]
    assert (b.calls, b.retries) == (live.count("call"), live.count("retry"))
