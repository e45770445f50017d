import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from dsl.plan import BreakerSpec
from policies.breaker import CircuitBreaker
from policies.clock import FakeClock


def consecutive(n=5, open=30.0, max_open=300.0, probes=1, slow=None):
    return BreakerSpec("consecutive", failures=n, open=open, max_open=max_open, probes=probes, slow=slow)


def rate(rate=0.5, window=20, min_calls=10, open=10.0, max_open=100.0, probes=1, slow=None):
    return BreakerSpec("rate", rate=rate, window=window, min_calls=min_calls, open=open,
                       max_open=max_open, probes=probes, slow=slow)


def test_opens_after_n_consecutive_failures(clock):
    b = CircuitBreaker(consecutive(5), clock)
    for _ in range(4):
        assert b.allow()
        b.record(False)
    assert b.state == "closed"
    b.record(False)
    assert b.state == "open"
    assert not b.allow()
    assert b.retry_in() == 30.0


def test_a_success_resets_the_consecutive_count(clock):
    b = CircuitBreaker(consecutive(3), clock)
    for ok in (False, False, True, False, False):
        b.record(ok)
    assert b.state == "closed"
    b.record(False)
    assert b.state == "open"


def test_open_then_half_open_then_closed(clock):
    b = CircuitBreaker(consecutive(1, open=30.0, probes=2), clock)
    b.record(False)
    clock.advance(29.999)
    assert not b.allow()
    assert b.retry_in() == pytest.approx(0.001)
    clock.advance(0.001)
    assert b.state == "half-open"
    assert b.retry_in() == 0.0
    assert b.allow() and b.allow()
    assert not b.allow()  # only K probes
    b.record(True)
    assert b.state == "half-open"
    b.record(True)
    assert b.state == "closed"
    assert b.allow()


def test_a_failed_probe_reopens_for_twice_as_long_capped_at_max_open(clock):
    b = CircuitBreaker(consecutive(1, open=30.0, max_open=300.0), clock)
    b.record(False)
    periods = []
    for _ in range(7):
        periods.append(b.retry_in())
        clock.advance(b.retry_in())
        assert b.allow()  # the probe
        b.record(False)
    assert periods == [30.0, 60.0, 120.0, 240.0, 300.0, 300.0, 300.0]
    assert b.opened == 8


def test_closing_resets_the_open_time(clock):
    b = CircuitBreaker(consecutive(1, open=10.0, max_open=100.0), clock)
    b.record(False)
    clock.advance(10.0)
    assert b.allow()
    b.record(False)  # reopen: 20 s
    assert b.retry_in() == 20.0
    clock.advance(20.0)
    assert b.allow()
    b.record(True)  # closed
    assert b.state == "closed" and b.open_for == 10.0
    b.record(False)
    assert b.retry_in() == 10.0


def test_failure_rate_needs_the_minimum_number_of_calls(clock):
    b = CircuitBreaker(rate(0.5, window=20, min_calls=10), clock)
    for _ in range(9):
        b.record(False)
    assert b.state == "closed"  # 100% failures, but only 9 calls
    b.record(False)
    assert b.state == "open"


def test_failure_rate_trips_when_the_rate_is_reached(clock):
    b = CircuitBreaker(rate(0.5, window=20, min_calls=10), clock)
    for _ in range(5):
        b.record(False)
    for _ in range(4):
        b.record(True)
    assert b.state == "closed"
    b.record(True)  # 10th call: 5 of 10 failed = 50%
    assert b.state == "open"


def test_failure_rate_counts_only_the_last_n_calls(clock):
    b = CircuitBreaker(rate(0.5, window=10, min_calls=10), clock)
    for _ in range(4):
        b.record(False)
    for _ in range(6):
        b.record(True)
    assert b.state == "closed"  # 4/10
    for _ in range(4):
        b.record(True)  # the four failures leave the window
    assert b.snapshot()["failures"] == 0
    for _ in range(4):
        b.record(False)
    assert b.state == "closed"  # 4/10 again
    b.record(False)
    assert b.state == "open"  # 5/10


def test_rate_below_threshold_stays_closed(clock):
    b = CircuitBreaker(rate(0.5, window=20, min_calls=10), clock)
    for i in range(200):
        b.record(i % 3 != 0)  # one in three fails
    assert b.state == "closed"


def test_slow_calls_count_as_failures(clock):
    b = CircuitBreaker(consecutive(2, slow=0.5), clock)
    b.record(True, 0.6)
    assert b.state == "closed"
    b.record(True, 0.4)  # fast success resets
    b.record(True, 0.6)
    b.record(True, 0.7)
    assert b.state == "open"


def test_without_slow_durations_do_not_matter(clock):
    b = CircuitBreaker(consecutive(1), clock)
    b.record(True, 1e6)
    b.record(True, None)
    assert b.state == "closed"


def test_late_outcomes_while_open_change_nothing(clock):
    b = CircuitBreaker(consecutive(1, open=5.0), clock)
    b.record(False)
    b.record(True)
    b.record(False)
    assert b.retry_in() == 5.0 and b.opened == 1


def test_late_outcomes_in_half_open_without_a_probe_change_nothing(clock):
    b = CircuitBreaker(consecutive(1, open=5.0), clock)
    b.record(False)
    clock.advance(5.0)
    assert b.state == "half-open"
    b.record(True)  # a call from before the trip, finishing late
    b.record(False)
    assert b.state == "half-open"
    assert b.allow()
    b.record(True)
    assert b.state == "closed"


def test_on_change_reports_each_transition(clock):
    seen: list[str] = []
    b = CircuitBreaker(consecutive(1, open=1.0), clock, on_change=seen.append)
    b.record(False)
    clock.advance(1.0)
    assert b.allow()
    b.record(False)
    clock.advance(2.0)
    assert b.allow()
    b.record(True)
    assert seen == ["open", "half-open", "open", "half-open", "closed"]


def test_lost_probes_are_handed_out_again_after_an_open_period(clock):
    b = CircuitBreaker(consecutive(1, open=10.0), clock)
    b.record(False)
    clock.advance(10.0)
    assert b.allow()  # the probe is never recorded (e.g. cancelled)
    assert not b.allow()
    clock.advance(9.0)
    assert not b.allow()
    clock.advance(1.0)
    assert b.allow()  # a new probe


def test_cancel_frees_a_probe_slot(clock):
    b = CircuitBreaker(consecutive(1, open=10.0), clock)
    b.record(False)
    clock.advance(10.0)
    assert b.allow()
    b.cancel()
    assert b.allow()
    b.record(True)
    assert b.state == "closed"


def test_snapshot(clock):
    b = CircuitBreaker(rate(0.5, window=20, min_calls=10, open=10.0), clock)
    b.record(False)
    b.record(True)
    assert b.snapshot() == {
        "state": "closed", "kind": "rate", "open_for": 10.0, "retry_in": 0.0,
        "opened": 0, "calls": 2, "failures": 1,
    }


@pytest.mark.parametrize(
    "spec,message",
    [
        (BreakerSpec("consecutive"), "failures"),
        (BreakerSpec("rate", rate=1.5), "failure-rate"),
        (BreakerSpec("rate", rate=0.5, window=0), "window"),
        (BreakerSpec("consecutive", failures=1, probes=0), "probes"),
        (BreakerSpec("sometimes"), "unknown"),  # type: ignore[arg-type]
    ],
)
def test_bad_specs(clock, spec, message):
    with pytest.raises(ValueError, match=message):
        CircuitBreaker(spec, clock)


class Model:
    """A deliberately plain reference: lists and if-statements, no ring buffers."""

    def __init__(self, spec: BreakerSpec) -> None:
        self.spec = spec
        self.state = "closed"
        self.open_for = spec.open
        self.until = 0.0
        self.history: list[bool] = []  # failed?
        self.streak = 0
        self.out = 0
        self.ok = 0
        self.since = 0.0

    def tick(self, now: float) -> None:
        if self.state == "open" and now >= self.until:
            self.state, self.out, self.ok, self.since = "half-open", 0, 0, now

    def trip(self, now: float) -> None:
        self.state, self.until = "open", now + self.open_for

    def allow(self, now: float) -> bool:
        self.tick(now)
        if self.state == "closed":
            return True
        if self.state == "open":
            return False
        if self.out >= self.spec.probes and now - self.since >= max(self.open_for, 1e-9):
            self.since, self.out = now, self.ok
        if self.out < self.spec.probes:
            self.out += 1
            return True
        return False

    def record(self, ok: bool, duration: float, now: float) -> None:
        failed = not ok or (self.spec.slow is not None and duration > self.spec.slow)
        if self.state == "closed":
            if self.spec.kind == "consecutive":
                self.streak = self.streak + 1 if failed else 0
                if self.streak >= self.spec.failures:
                    self.trip(now)
            else:
                self.history = (self.history + [failed])[-self.spec.window:]
                n, f = len(self.history), sum(self.history)
                if f and n >= min(self.spec.min_calls, self.spec.window) and f >= self.spec.rate * n - 1e-9:
                    self.trip(now)
        elif self.state == "half-open" and self.ok < self.out:
            if failed:
                self.open_for = min(self.open_for * 2, self.spec.max_open)
                self.trip(now)
            else:
                self.ok += 1
                if self.ok >= self.spec.probes:
                    self.state, self.open_for, self.streak, self.history = "closed", self.spec.open, 0, []


class BreakerMachine(RuleBasedStateMachine):
    @initialize(
        kind=st.sampled_from(["consecutive", "rate"]),
        failures=st.integers(1, 4),
        rate=st.sampled_from([0.25, 0.5, 1.0]),
        window=st.integers(1, 8),
        min_calls=st.integers(1, 10),
        probes=st.integers(1, 3),
        slow=st.sampled_from([None, 0.5]),
    )
    def setup(self, kind, failures, rate, window, min_calls, probes, slow):
        spec = BreakerSpec(kind, failures=failures, rate=rate, window=window, min_calls=min_calls,
                           open=4.0, max_open=40.0, probes=probes, slow=slow)
        self.clock = FakeClock(0.0)
        self.breaker = CircuitBreaker(spec, self.clock)
        self.model = Model(spec)

    @rule(seconds=st.sampled_from([0.5, 1.0, 4.0, 8.0, 40.0]))
    def wait(self, seconds):
        self.clock.advance(seconds)

    @rule()
    def allow(self):
        assert self.breaker.allow() == self.model.allow(self.clock.now())

    @rule(ok=st.booleans(), duration=st.sampled_from([0.1, 0.9]))
    def record(self, ok, duration):
        self.breaker.record(ok, duration)
        self.model.record(ok, duration, self.clock.now())

    @invariant()
    def same_state(self):
        now = self.clock.now()
        self.model.tick(now)
        assert self.breaker.state == self.model.state
        expected_wait = max(0.0, self.model.until - now) if self.model.state == "open" else 0.0
        assert self.breaker.retry_in() == pytest.approx(expected_wait)
        assert self.breaker.open_for == self.model.open_for


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None, database=None)
test_breaker_matches_reference_model = BreakerMachine.TestCase


def test_open_time_doubles_up_to_ten_times_the_first(clock):
    b = CircuitBreaker(rate(0.5, window=4, min_calls=2, open=10.0, max_open=100.0), clock)
    b.record(False)
    b.record(False)
    periods = []
    for _ in range(6):
        periods.append(b.retry_in())
        clock.advance(b.retry_in())
        assert b.allow()
        b.record(False)
    assert periods == [10.0, 20.0, 40.0, 80.0, 100.0, 100.0]


def test_a_closed_rate_breaker_starts_counting_afresh(clock):
    b = CircuitBreaker(rate(0.5, window=10, min_calls=4, open=1.0, probes=2), clock)
    for _ in range(4):
        b.record(False)
    clock.advance(1.0)
    assert b.allow() and b.allow()
    assert b.snapshot() == {
        "state": "half-open", "kind": "rate", "open_for": 1.0, "retry_in": 0.0, "opened": 1,
        "calls": 4, "failures": 4, "probes_out": 2, "probes_ok": 0,
    }
    b.record(True)
    b.record(True)
    assert b.state == "closed"
    assert b.snapshot()["calls"] == 0
    for _ in range(3):
        b.record(False)
    assert b.state == "closed"  # the old failures are gone: 3 calls < min 4
    b.record(False)
    assert b.state == "open"
