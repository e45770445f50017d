import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsl.plan import BackoffSpec
from policies.backoff import Backoff


def seq(b: Backoff, n: int, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    out: list[float] = []
    prev = None
    for i in range(1, n + 1):
        prev = b.delay(i, rng, prev)
        out.append(prev)
    return out


def test_exponential_without_jitter_doubles_up_to_max():
    b = Backoff(BackoffSpec("exponential", 0.1, 1.0, "none"))
    assert seq(b, 7) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_constant_is_always_base():
    b = Backoff(BackoffSpec("constant", 0.25, 0.25, "none"))
    assert seq(b, 5) == [0.25] * 5


def test_constant_ignores_a_larger_max():
    b = Backoff(BackoffSpec("constant", 0.25, 9.0, "none"))
    assert seq(b, 3) == [0.25] * 3


def test_full_jitter_exact_sequence():
    b = Backoff(BackoffSpec("exponential", 0.1, 1.0, "full"))
    draws = random.Random(42)
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0]
    expected = [draws.random() * c for c in ceilings]
    assert seq(b, 5, seed=42) == expected
    assert seq(b, 1, seed=42) == [pytest.approx(0.06394267984578837)]


def test_equal_jitter_exact_sequence():
    b = Backoff(BackoffSpec("exponential", 0.1, 1.0, "equal"))
    draws = random.Random(3)
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0]
    expected = [c / 2 + draws.random() * c / 2 for c in ceilings]
    assert seq(b, 5, seed=3) == expected


def test_decorrelated_jitter_threads_the_previous_delay():
    b = Backoff(BackoffSpec("exponential", 0.1, 1.0, "decorrelated"))
    draws = random.Random(9)
    prev = 0.1
    expected = []
    for _ in range(8):
        prev = min(1.0, 0.1 + draws.random() * (prev * 3 - 0.1))
        expected.append(prev)
    assert seq(b, 8, seed=9) == pytest.approx(expected)


def test_decorrelated_first_delay_lies_between_base_and_three_base():
    b = Backoff(BackoffSpec("exponential", 0.1, 10.0, "decorrelated"))
    rng = random.Random(0)
    for _ in range(200):
        assert 0.1 <= b.delay(1, rng) <= 0.3


@settings(database=None)
@given(
    kind=st.sampled_from(["full", "equal", "none"]),
    seed=st.integers(0, 10_000),
    n=st.integers(1, 200),
)
def test_jitter_bounds(kind, seed, n):
    b = Backoff(BackoffSpec("exponential", 0.05, 2.0, kind))
    d = b.delay(n, random.Random(seed))
    ceiling = min(2.0, 0.05 * 2 ** (n - 1))
    low = {"full": 0.0, "equal": ceiling / 2, "none": ceiling}[kind]
    assert low <= d <= ceiling


@settings(database=None)
@given(seed=st.integers(0, 10_000), steps=st.integers(1, 30))
def test_decorrelated_never_exceeds_max_nor_drops_below_base(seed, steps):
    b = Backoff(BackoffSpec("exponential", 0.05, 2.0, "decorrelated"))
    rng = random.Random(seed)
    prev = None
    for i in range(1, steps + 1):
        d = b.delay(i, rng, prev)
        assert 0.05 <= d <= 2.0
        assert d <= max(0.05, 3 * (prev if prev is not None else 0.05))
        prev = d


def test_full_jitter_mean_is_half_the_ceiling():
    b = Backoff(BackoffSpec("exponential", 1.0, 1.0, "full"))
    rng = random.Random(5)
    mean = sum(b.delay(1, rng) for _ in range(20_000)) / 20_000
    assert mean == pytest.approx(0.5, abs=0.01)


def test_huge_retry_numbers_do_not_overflow():
    b = Backoff(BackoffSpec("exponential", 0.1, 3.0, "none"))
    assert b.delay(10_000, random.Random(1)) == 3.0


def test_bad_input_is_a_clear_error():
    b = Backoff(BackoffSpec("exponential", 0.1, 1.0, "none"))
    with pytest.raises(ValueError, match="start at 1"):
        b.delay(0, random.Random(1))
    with pytest.raises(ValueError, match="jitter"):
        Backoff(BackoffSpec("exponential", 0.1, 1.0, "wild"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        Backoff(BackoffSpec("constant", -1.0, -1.0))
