"""dsl.worstcase: attempts and worst-case time of one service, by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dsl.plan import (
    BackoffSpec,
    BudgetSpec,
    ConcurrencySpec,
    FallbackSpec,
    HedgeSpec,
    RetrySpec,
    ServicePlan,
    ShardPlan,
)
from dsl.worstcase import (
    attempts,
    backoff_bound,
    breakdown,
    fmt_seconds,
    steady_attempts,
    worst_case_time,
)

# The contract's `critical` policy: timeout 2s, retry 3 ... backoff 100ms..1s per-try 600ms budget 20%
PAYMENTS = ServicePlan(
    name="payments",
    timeout=2.0,
    retry=RetrySpec(
        retries=3,
        backoff=BackoffSpec("exponential", 0.1, 1.0),
        per_try_timeout=0.6,
        budget=BudgetSpec(0.2),
    ),
    concurrency=ConcurrencySpec(64, queue=32),
)


def test_attempts_are_retries_plus_one_plus_hedges():
    assert attempts(ServicePlan(name="x")) == 1
    assert attempts(PAYMENTS) == 4
    assert attempts(ServicePlan(name="r", hedge=HedgeSpec(delay=0.08))) == 2
    both = ServicePlan(name="b", retry=RetrySpec(retries=2), hedge=HedgeSpec(delay=0.1, max_extra=3))
    assert attempts(both) == 6


def test_backoff_bounds():
    exp = BackoffSpec("exponential", 0.1, 1.0)
    assert [backoff_bound(exp, k) for k in range(1, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert backoff_bound(BackoffSpec("constant", 0.25, 0.25), 7) == 0.25
    dec = BackoffSpec("exponential", 0.1, 1.0, jitter="decorrelated")
    assert [round(backoff_bound(dec, k), 9) for k in (1, 2, 3)] == [0.3, 0.9, 1.0]
    assert backoff_bound(None, 3) == 0.0
    assert backoff_bound(exp, 0) == 0.0


def test_worst_case_time_is_capped_by_the_timeout():
    # 4 × 600ms + 100ms + 200ms + 400ms = 3.1s, capped at 2s
    b = breakdown(PAYMENTS)
    assert b.uncapped == pytest.approx(3.1)
    assert worst_case_time(PAYMENTS) == 2.0
    assert b.capped_by_timeout
    assert b.formula() == "min(2s, 4 × 600ms + 100ms + 200ms + 400ms) = 2s"


def test_worst_case_time_below_the_timeout():
    svc = replace(PAYMENTS, timeout=5.0)
    assert worst_case_time(svc) == pytest.approx(3.1)
    assert not breakdown(svc).capped_by_timeout


def test_without_per_try_each_try_may_take_the_whole_timeout():
    svc = ServicePlan(name="x", timeout=1.0, retry=RetrySpec(retries=2))
    assert breakdown(svc).uncapped == 3.0
    assert worst_case_time(svc) == 1.0
    assert worst_case_time(ServicePlan(name="plain")) == 15.0  # built-in default


def test_hedges_add_no_time():
    svc = ServicePlan(name="r", timeout=0.3, hedge=HedgeSpec(delay=0.08, max_extra=2))
    assert worst_case_time(svc) == 0.3


def test_sharded_service_uses_its_worst_shard():
    svc = ServicePlan(
        name="users",
        shards=(
            ShardPlan(name="a", endpoints=(), timeout=1.0, retry=RetrySpec(retries=5)),
            ShardPlan(name="b", endpoints=(), timeout=3.0, retry=RetrySpec(retries=1)),
        ),
    )
    assert attempts(svc) == 6
    assert worst_case_time(svc) == 3.0
    assert breakdown(svc).shard == "b"


def test_steady_attempts_with_a_budget():
    assert steady_attempts(PAYMENTS) == pytest.approx(1.2)
    assert steady_attempts(ServicePlan(name="x", retry=RetrySpec(retries=2))) == 3.0
    tiny = ServicePlan(name="t", retry=RetrySpec(retries=1, budget=BudgetSpec(1.0)))
    assert steady_attempts(tiny) == 2.0  # never above the attempts themselves


def test_breakdown_lines_for_explain():
    svc = replace(PAYMENTS, fallbacks=(FallbackSpec(kind="service", service="backup"),))
    assert breakdown(svc).lines() == [
        "worst-case attempts: 4 = 3 retries + 1 + 0 hedges",
        "worst-case time: min(2s, 4 × 600ms + 100ms + 200ms + 400ms) = 2s",
        "with the retry budget of 20%: about 1.2 attempts per call in steady state",
        "plus up to 1s waiting in the concurrency queue",
        "plus the fallback service's own time after a failure: backup",
    ]


@pytest.mark.parametrize(
    "seconds,text",
    [(0, "0s"), (0.0005, "500us"), (0.1, "100ms"), (0.1 + 0.2, "300ms"), (2.4000000000000004, "2.4s"),
     (15, "15s"), (90, "90s"), (300, "5m"), (7200, "2h")],
)
def test_fmt_seconds(seconds, text):
    assert fmt_seconds(seconds) == text
