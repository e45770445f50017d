import random

import pytest

from dsl.plan import ChaosSpec
from policies.chaos import ChaosAction, ChaosInjector


def test_no_specs_no_faults():
    c = ChaosInjector([], random.Random(1))
    assert all(c.decide() is None for _ in range(100))


def test_abort_always_and_never():
    assert ChaosInjector([ChaosSpec("abort", 1.0)], random.Random(1)).decide() == ChaosAction("abort", 503, 0.0)
    assert ChaosInjector([ChaosSpec("abort", 1.0, status=500)], random.Random(1)).decide().status == 500
    never = ChaosInjector([ChaosSpec("abort", 0.0)], random.Random(1))
    assert all(never.decide() is None for _ in range(1000))


def test_seeded_abort_probability_is_exact():
    c = ChaosInjector([ChaosSpec("abort", 0.1, status=502)], random.Random(77))
    hits = [c.decide() is not None for _ in range(10_000)]
    draws = random.Random(77)
    assert hits == [draws.random() < 0.1 for _ in range(10_000)]
    assert 900 <= sum(hits) <= 1100
    assert c.injected == sum(hits)


def test_seeded_delay_probability():
    c = ChaosInjector([ChaosSpec("delay", 0.25, delay=0.4)], random.Random(5))
    actions = [c.decide() for _ in range(4000)]
    delayed = [a for a in actions if a is not None]
    assert all(a == ChaosAction("delay", None, 0.4) for a in delayed)
    assert len(delayed) / 4000 == pytest.approx(0.25, abs=0.02)


def test_delays_add_up_and_an_abort_can_follow_a_delay():
    specs = [ChaosSpec("delay", 1.0, delay=0.1), ChaosSpec("delay", 1.0, delay=0.2), ChaosSpec("abort", 1.0)]
    assert ChaosInjector(specs, random.Random(1)).decide() == ChaosAction("abort", 503, pytest.approx(0.3))


def test_the_first_abort_sets_the_status():
    specs = [ChaosSpec("abort", 1.0, status=500), ChaosSpec("abort", 1.0, status=502)]
    assert ChaosInjector(specs, random.Random(1)).decide().status == 500


def test_each_spec_draws_once_per_call():
    rng = random.Random(3)
    c = ChaosInjector([ChaosSpec("abort", 0.5), ChaosSpec("delay", 0.5, delay=1.0)], rng)
    c.decide()
    ref = random.Random(3)
    ref.random(), ref.random()
    assert rng.random() == ref.random()


@pytest.mark.parametrize(
    "spec,message",
    [
        (ChaosSpec("abort", 1.5), "0..100%"),
        (ChaosSpec("delay", 0.5), "duration"),
        (ChaosSpec("explode", 0.5), "unknown"),  # type: ignore[arg-type]
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        ChaosInjector([spec], random.Random(1))
