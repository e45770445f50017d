import pytest

from dsl.plan import HedgeSpec
from policies.hedge import HedgeDelay
from policies.latency import LatencyWindow


def test_fixed_delay():
    h = HedgeDelay(HedgeSpec(delay=0.08), LatencyWindow())
    assert h.delay() == 0.08
    assert h.max_extra == 1


def test_percentile_uses_the_initial_delay_until_warm():
    w = LatencyWindow()
    h = HedgeDelay(HedgeSpec(percentile=0.95, max_extra=2), w)
    assert h.delay() == 0.100
    for i in range(1, 20):
        w.record(i / 100)
    assert h.delay() == 0.100  # 19 calls seen: still warming up
    w.record(0.20)
    assert h.delay() == 0.19  # p95 of 0.01..0.20 is the 19th value
    assert h.max_extra == 2


def test_percentile_never_drops_below_the_floor():
    w = LatencyWindow()
    h = HedgeDelay(HedgeSpec(percentile=0.95, min_delay=0.05), w)
    for _ in range(50):
        w.record(0.001)
    assert h.delay() == 0.05


def test_initial_delay_respects_the_floor_too():
    h = HedgeDelay(HedgeSpec(percentile=0.9, min_delay=0.3), LatencyWindow())
    assert h.delay() == 0.3


def test_percentile_follows_the_rolling_window():
    w = LatencyWindow(size=20)
    h = HedgeDelay(HedgeSpec(percentile=0.5, warmup_calls=20), w)
    for _ in range(20):
        w.record(0.5)
    assert h.delay() == 0.5
    for _ in range(20):
        w.record(0.02)
    assert h.delay() == 0.02


def test_bad_specs():
    with pytest.raises(ValueError, match="fixed delay or a percentile"):
        HedgeDelay(HedgeSpec(), LatencyWindow())
    with pytest.raises(ValueError, match="percentile"):
        HedgeDelay(HedgeSpec(percentile=95.0), LatencyWindow())
    with pytest.raises(ValueError, match="at least one"):
        HedgeDelay(HedgeSpec(delay=0.1, max_extra=0), LatencyWindow())
