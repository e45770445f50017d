import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsl.plan import EndpointSpec, HealthSpec, OutlierSpec
from policies.health import (
    ActiveHealth,
    EndpointState,
    OutlierDetector,
    select_tier,
    usable,
)


def ep(url: str, tier: int = 0, weight: int = 1) -> EndpointState:
    return EndpointState(url=url, weight=weight, tier=tier)


# -- active health ---------------------------------------------------------------------


def test_fall_after_n_failed_checks_and_rise_after_m_passing():
    h = ActiveHealth(HealthSpec("/healthz", fall=3, rise=2))
    e = ep("http://a")
    assert [h.observe(e, False, t) for t in (0, 1)] == [False, False]
    assert e.healthy
    assert h.observe(e, False, 2) is True
    assert not e.healthy
    assert h.observe(e, False, 3) is False  # already down: no change
    assert h.observe(e, True, 4) is False
    assert h.observe(e, True, 5) is True
    assert e.healthy


def test_counters_need_results_in_a_row():
    h = ActiveHealth(HealthSpec("/healthz", fall=2, rise=2))
    e = ep("http://a")
    for ok in (False, True, False, True, False, True):
        assert h.observe(e, ok, 0.0) is False
    assert e.healthy
    h.observe(e, False, 0.0)
    h.observe(e, False, 0.0)
    assert not e.healthy
    for ok in (True, False, True, False):
        assert h.observe(e, ok, 0.0) is False
    assert not e.healthy


def test_checks_are_scheduled_every_interval():
    h = ActiveHealth(HealthSpec("/healthz", interval=2.0))
    e = ep("http://a")
    assert h.due(e, 100.0)  # never checked: due at once
    h.observe(e, True, 100.0)
    assert e.next_check == 102.0
    assert not h.due(e, 101.9)
    assert h.due(e, 102.0)


@pytest.mark.parametrize(
    "expect,status,ok",
    [(("2xx",), 200, True), (("2xx",), 204, True), (("2xx",), 301, False),
     (("200", "3xx"), 302, True), (("200",), 201, False), (("2xx",), 503, False)],
)
def test_expected_statuses(expect, status, ok):
    assert ActiveHealth(HealthSpec("/h", expect=expect)).expects(status) is ok


def test_bad_health_specs():
    with pytest.raises(ValueError, match="fall and rise"):
        ActiveHealth(HealthSpec("/h", fall=0))
    with pytest.raises(ValueError, match="expect"):
        ActiveHealth(HealthSpec("/h", expect=("ok",)))


# -- outlier ejection ------------------------------------------------------------------


def test_ejection_after_consecutive_failures_grows_with_each_ejection(clock):
    d = OutlierDetector(OutlierSpec(failures=3, eject=30.0, max_fraction=0.5), clock)
    a, b = ep("http://a"), ep("http://b")
    tier = [a, b]
    durations = []
    for _ in range(3):
        assert [d.record(a, False, tier) for _ in range(3)] == [False, False, True]
        assert not usable(a, clock.now())
        durations.append(a.ejected_until - clock.now())
        clock.advance(a.ejected_until - clock.now())
        assert usable(a, clock.now())
    assert durations == [30.0, 60.0, 90.0]
    assert a.ejections == 3


def test_a_success_resets_the_failure_streak(clock):
    d = OutlierDetector(OutlierSpec(failures=2), clock)
    a, b = ep("http://a"), ep("http://b")
    d.record(a, False, [a, b])
    d.record(a, True, [a, b])
    assert d.record(a, False, [a, b]) is False
    assert d.record(a, False, [a, b]) is True


def test_never_more_than_max_fraction_of_a_tier_ejected(clock):
    d = OutlierDetector(OutlierSpec(failures=1, eject=10.0, max_fraction=0.5), clock)
    tier = [ep(f"http://{n}") for n in "abcd"]
    results = [d.record(e, False, tier) for e in tier]
    assert results == [True, True, False, False]  # 2 of 4 = 50%
    assert sum(1 for e in tier if not usable(e, clock.now())) == 2
    clock.advance(10.0)  # the first two come back
    assert d.record(tier[2], False, tier) is True  # room again: the next failure ejects
    assert d.record(tier[3], False, tier) is True
    assert d.record(tier[0], False, tier) is False


def test_the_cap_counts_only_the_same_tier(clock):
    d = OutlierDetector(OutlierSpec(failures=1, max_fraction=0.5), clock)
    a, b, backup = ep("http://a"), ep("http://b"), ep("http://c", tier=1)
    backup.ejected_until = clock.now() + 100
    assert d.record(a, False, [a, b, backup]) is True


def test_one_endpoint_may_always_be_ejected_so_a_lone_primary_fails_over(clock):
    d = OutlierDetector(OutlierSpec(failures=1, max_fraction=0.5), clock)
    primary, backup = ep("http://a"), ep("http://b", tier=1)
    assert d.record(primary, False, [primary, backup]) is True
    assert select_tier([primary, backup], clock.now()) == ([backup], False)


def test_a_low_cap_still_ejects_one_but_no_more(clock):
    d = OutlierDetector(OutlierSpec(failures=1, max_fraction=0.1), clock)
    tier = [ep(f"http://{n}") for n in "abcd"]
    assert [d.record(e, False, tier) for e in tier] == [True, False, False, False]


def test_max_zero_percent_turns_ejection_off(clock):
    d = OutlierDetector(OutlierSpec(failures=1, max_fraction=0.0), clock)
    a, b = ep("http://a"), ep("http://b")
    assert [d.record(a, False, [a, b]) for _ in range(5)] == [False] * 5


def test_failures_while_ejected_are_not_counted(clock):
    d = OutlierDetector(OutlierSpec(failures=2, eject=5.0), clock)
    a, b = ep("http://a"), ep("http://b")
    d.record(a, False, [a, b])
    d.record(a, False, [a, b])
    until = a.ejected_until
    for _ in range(5):
        assert d.record(a, False, [a, b]) is False  # reached in panic, say
    assert a.ejected_until == until and a.ejections == 1


# -- tiers and panic -------------------------------------------------------------------


def test_select_tier_prefers_the_primaries(clock):
    p1, p2, f1 = ep("http://p1"), ep("http://p2"), ep("http://f1", tier=1)
    assert select_tier([f1, p1, p2], clock.now()) == ([p1, p2], False)
    p1.healthy = False
    assert select_tier([f1, p1, p2], clock.now()) == ([p2], False)


def test_failover_when_every_primary_is_unhealthy_ejected_or_broken(clock):
    p1, p2 = ep("http://p1"), ep("http://p2")
    f1, f2, g1 = ep("http://f1", tier=1), ep("http://f2", tier=1), ep("http://g1", tier=2)
    everything = [p1, p2, f1, f2, g1]
    p1.healthy = False
    p2.ejected_until = clock.now() + 30
    assert select_tier(everything, clock.now()) == ([f1, f2], False)
    broken = {"http://f1", "http://f2"}
    assert select_tier(everything, clock.now(), lambda e: e.url in broken) == ([g1], False)
    clock.advance(30)  # p2's ejection ends: back to the primaries
    assert select_tier(everything, clock.now()) == ([p2], False)


def test_panic_returns_the_primaries_when_nothing_is_usable(clock):
    p1, p2, f1 = ep("http://p1"), ep("http://p2"), ep("http://f1", tier=1)
    for e in (p1, p2, f1):
        e.healthy = False
    assert select_tier([f1, p1, p2], clock.now()) == ([p1, p2], True)


def test_panic_without_tier_zero_uses_the_lowest_tier(clock):
    f1, g1 = ep("http://f1", tier=1), ep("http://g1", tier=2)
    f1.healthy = g1.healthy = False
    assert select_tier([g1, f1], clock.now()) == ([f1], True)


def test_endpoint_state_from_spec_and_snapshot(clock):
    e = EndpointState.from_spec(EndpointSpec("http://a", weight=3, tier=1))
    assert (e.url, e.weight, e.tier, e.healthy) == ("http://a", 3, 1, True)
    e.ejected_until = clock.now() + 5
    snap = e.snapshot(clock.now())
    assert snap["ejected"] is True and snap["ejected_for"] == 5.0


def test_bad_outlier_spec(clock):
    with pytest.raises(ValueError, match="at least 1"):
        OutlierDetector(OutlierSpec(failures=0), clock)
    with pytest.raises(ValueError, match="max"):
        OutlierDetector(OutlierSpec(failures=1, max_fraction=1.5), clock)


@settings(max_examples=200, deadline=None, database=None)
@given(
    tiers=st.lists(st.integers(0, 3), min_size=1, max_size=8),
    healthy=st.lists(st.booleans(), min_size=8, max_size=8),
    ejected=st.lists(st.booleans(), min_size=8, max_size=8),
    broken=st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_select_tier_matches_its_definition(tiers, healthy, ejected, broken):
    now = 100.0
    endpoints = [ep(f"http://e{i}", tier=t) for i, t in enumerate(tiers)]
    for i, e in enumerate(endpoints):
        e.healthy = healthy[i]
        e.ejected_until = now + 1 if ejected[i] else 0.0
    is_broken = {e.url for i, e in enumerate(endpoints) if broken[i]}
    chosen, panic = select_tier(endpoints, now, lambda e: e.url in is_broken)
    good = [e for e in endpoints if usable(e, now) and e.url not in is_broken]
    if good:
        first = min(e.tier for e in good)
        assert (chosen, panic) == ([e for e in good if e.tier == first], False)
    else:
        lowest = min(tiers)
        assert (chosen, panic) == ([e for e in endpoints if e.tier == lowest], True)
