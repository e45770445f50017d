import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.latency import LatencyWindow


def test_empty_window_has_no_percentiles():
    w = LatencyWindow()
    assert w.count == 0 and w.total == 0
    assert w.percentile(0.95) is None
    assert w.median() is None


def test_nearest_rank_percentiles():
    w = LatencyWindow(size=256)
    for i in range(1, 101):
        w.record(i / 1000)
    assert w.count == 100
    assert w.percentile(0.95) == 0.095
    assert w.percentile(0.99) == 0.099
    assert w.percentile(0.5) == 0.050
    assert w.percentile(0.0) == 0.001
    assert w.percentile(1.0) == 0.100
    assert w.median() == pytest.approx(0.0505)  # mean of the two middle values


def test_p95_of_twenty_samples_is_the_nineteenth():
    w = LatencyWindow()
    for i in range(1, 21):
        w.record(float(i))
    assert w.percentile(0.95) == 19.0  # ceil(0.95 * 20) = 19, despite 18.999... in floats


def test_window_rolls_over_oldest_first():
    w = LatencyWindow(size=4)
    for v in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
        w.record(v)
    assert w.count == 4 and w.total == 6
    assert w.percentile(0.25) == 3.0
    assert w.percentile(1.0) == 6.0
    assert w.median() == 4.5
    w.record(0.5)  # evicts 3.0
    assert w.percentile(0.25) == 0.5
    assert w.median() == 4.5


def test_odd_count_median():
    w = LatencyWindow()
    for v in (3.0, 1.0, 2.0):
        w.record(v)
    assert w.median() == 2.0


def test_nan_is_ignored_and_negative_is_zero():
    w = LatencyWindow()
    w.record(float("nan"))
    assert w.count == 0
    w.record(-0.5)
    assert w.percentile(1.0) == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        LatencyWindow(0)
    w = LatencyWindow()
    w.record(1.0)
    with pytest.raises(ValueError, match="0..1"):
        w.percentile(95)


@settings(max_examples=150, deadline=None, database=None)
@given(
    size=st.integers(1, 20),
    values=st.lists(st.floats(0, 100, allow_nan=False), max_size=60),
    p=st.floats(0, 1),
)
def test_matches_a_sorted_reference(size, values, p):
    w = LatencyWindow(size)
    for v in values:
        w.record(v)
    ref = sorted(values[-size:]) if values else []
    assert w.count == len(ref)
    if not ref:
        assert w.percentile(p) is None
        return
    rank = max(1, math.ceil(p * len(ref) - 1e-9))
    assert w.percentile(p) == ref[rank - 1]
    n = len(ref)
    expected_median = ref[n // 2] if n % 2 else (ref[n // 2 - 1] + ref[n // 2]) / 2
    assert w.median() == expected_median
