import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.balancer import make_balancer
from policies.health import EndpointState


def eps(*weights: int) -> list[EndpointState]:
    return [EndpointState(url=f"http://{chr(97 + i)}", weight=w) for i, w in enumerate(weights)]


def names(picked) -> str:
    return "".join(e.url[-1] for e in picked)


def test_round_robin_is_smooth_and_weighted():
    b = make_balancer("round-robin", random.Random(0))
    cands = eps(5, 1, 1)
    assert names(b.pick(cands) for _ in range(14)) == "aabacaa" * 2  # nginx's sequence


def test_round_robin_equal_weights_cycles():
    b = make_balancer("round-robin", random.Random(0))
    cands = eps(1, 1, 1)
    assert names(b.pick(cands) for _ in range(6)) == "abcabc"


def test_round_robin_counts_match_weights_exactly():
    b = make_balancer("round-robin", random.Random(0))
    cands = eps(1, 2, 3)
    counts = Counter(b.pick(cands).url for _ in range(600))
    assert [counts[e.url] for e in cands] == [100, 200, 300]


@pytest.mark.parametrize("kind", ["random", "least-request"])
def test_seeded_idle_distribution_respects_weights(kind):
    b = make_balancer(kind, random.Random(11))
    cands = eps(1, 2, 1)
    counts = Counter(b.pick(cands).url for _ in range(20_000))
    shares = [counts[e.url] / 20_000 for e in cands]
    assert shares == pytest.approx([0.25, 0.5, 0.25], abs=0.02)


def test_least_request_picks_the_less_loaded_of_two():
    b = make_balancer("least-request", random.Random(3))
    a, busy = eps(1, 1)
    busy.in_flight = 5
    assert all(b.pick([a, busy]) is a for _ in range(100))  # with two, both are always drawn


def test_least_request_weighs_in_flight_by_weight():
    b = make_balancer("least-request", random.Random(3))
    small, big = eps(1, 4)
    small.in_flight, big.in_flight = 1, 3  # 1/1 > 3/4
    assert all(b.pick([small, big]) is big for _ in range(50))


def test_least_request_spreads_load_across_many():
    b = make_balancer("least-request", random.Random(5))
    cands = eps(*([1] * 8))
    for _ in range(800):
        b.pick(cands).in_flight += 1  # calls that never finish: load should even out
    loads = sorted(e.in_flight for e in cands)
    assert loads[-1] - loads[0] <= 10


@pytest.mark.parametrize("kind", ["round-robin", "least-request", "random"])
def test_untried_endpoints_are_preferred(kind):
    b = make_balancer(kind, random.Random(1))
    cands = eps(1, 1, 1)
    for _ in range(50):
        assert b.pick(cands, exclude={"http://a", "http://b"}).url == "http://c"
    picked = {b.pick(cands, exclude={e.url for e in cands}).url for _ in range(100)}
    assert len(picked) > 1  # all tried: any of them again


@pytest.mark.parametrize("kind", ["round-robin", "least-request", "random"])
def test_a_single_candidate_and_none(kind):
    b = make_balancer(kind, random.Random(1))
    (only,) = eps(1)
    assert b.pick([only]) is only
    assert b.pick([only], exclude={only.url}) is only
    with pytest.raises(ValueError, match="no endpoint"):
        b.pick([])


def test_seeded_choices_are_repeatable():
    cands = eps(1, 2, 3)
    runs = [names(make_balancer("random", random.Random(9)).pick(cands) for _ in range(50)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_unknown_balance():
    with pytest.raises(ValueError, match="round-robin, least-request or random"):
        make_balancer("fastest", random.Random(1))


@settings(max_examples=150, deadline=None, database=None)
@given(
    kind=st.sampled_from(["round-robin", "least-request", "random"]),
    weights=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    loads=st.lists(st.integers(0, 9), min_size=6, max_size=6),
    tried=st.sets(st.integers(0, 5)),
    seed=st.integers(0, 1000),
)
def test_pick_is_a_candidate_and_avoids_tried_ones_when_it_can(kind, weights, loads, tried, seed):
    cands = eps(*weights)
    for c, load in zip(cands, loads, strict=False):
        c.in_flight = load
    exclude = {cands[i].url for i in tried if i < len(cands)}
    b = make_balancer(kind, random.Random(seed))
    for _ in range(5):
        picked = b.pick(cands, exclude)
        assert picked in cands
        if len(exclude) < len(cands):
            assert picked.url not in exclude
