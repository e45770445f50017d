"""Choosing an endpoint within a tier: round-robin, least-request or random, all weighted.

- round-robin: nginx's smooth weighted round-robin (weights 5,1,1 give a a b a c a a,
  not a a a a a b c).
- least-request: power of two choices. Two distinct candidates are drawn at random in
  proportion to their weights; the one with fewer calls in flight per unit of weight
  wins, the first drawn on a tie — so idle endpoints still share calls by weight.
- random: one draw in proportion to weight.

`pick` prefers candidates whose url is not in `exclude` (endpoints a retry or a hedge
already tried), and falls back to all of them when every one was tried.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Protocol

from policies.health import EndpointState


class Balancer(Protocol):
    kind: str

    def pick(
        self, candidates: Sequence[EndpointState], exclude: Collection[str] = ()
    ) -> EndpointState: ...


def _prefer_untried(
    candidates: Sequence[EndpointState], exclude: Collection[str]
) -> Sequence[EndpointState]:
    if not candidates:
        raise ValueError("no endpoint to pick from")
    if exclude:
        fresh = [c for c in candidates if c.url not in exclude]
        if fresh:
            return fresh
    return candidates


def _weight(ep: EndpointState) -> int:
    w = ep.weight
    return w if w > 0 else 1


def _weights(candidates: Sequence[EndpointState]) -> list[int]:
    """Each candidate's weight, as `_weight` gives it."""
    return [w if w > 0 else 1 for w in [c.weight for c in candidates]]


def _draw(weights: list[int], rng: random.Random, skip: int = -1) -> int:
    """`_weighted_index` over weights already computed."""
    total = 0
    for i, w in enumerate(weights):
        if i != skip:
            total += w
    r = rng.random() * total
    last = -1
    for i, w in enumerate(weights):
        if i == skip:
            continue
        r -= w
        last = i
        if r < 0:
            return i
    return last  # float rounding at the very top of the range


def _weighted_index(
    candidates: Sequence[EndpointState], rng: random.Random, skip: int = -1
) -> int:
    """Index of one candidate drawn with probability weight / total (ignoring `skip`)."""
    return _draw(_weights(candidates), rng, skip)


class _Picker:
    """What every balancer does first: prefer endpoints this call has not tried, and
    skip the choice when only one is left; `_choose` is each strategy's own part."""

    kind = ""

    def pick(
        self, candidates: Sequence[EndpointState], exclude: Collection[str] = ()
    ) -> EndpointState:
        candidates = _prefer_untried(candidates, exclude)
        if len(candidates) == 1:
            return candidates[0]
        return self._choose(candidates)

    def _choose(self, candidates: Sequence[EndpointState]) -> EndpointState:
        raise NotImplementedError


class RoundRobin(_Picker):
    kind = "round-robin"

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def _choose(self, candidates: Sequence[EndpointState]) -> EndpointState:
        current = self._current
        if len(current) > 4 * len(candidates) + 64:
            current.clear()  # endpoints came and went: drop their stale counters
        best: EndpointState | None = None
        best_value = 0.0
        total = 0
        for c in candidates:
            w = _weight(c)
            total += w
            v = current.get(c.url, 0.0) + w
            current[c.url] = v
            if best is None or v > best_value:
                best = c
                best_value = v
        assert best is not None
        current[best.url] = best_value - total
        return best


class LeastRequest(_Picker):
    kind = "least-request"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def _choose(self, candidates: Sequence[EndpointState]) -> EndpointState:
        rng = self._rng
        weights = _weights(candidates)
        i = _draw(weights, rng)
        j = _draw(weights, rng, i)
        a, b = candidates[i], candidates[j]
        # a.in_flight / a.weight <= b.in_flight / b.weight, without division
        if a.in_flight * weights[j] <= b.in_flight * weights[i]:
            return a
        return b


class RandomWeighted(_Picker):
    kind = "random"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def _choose(self, candidates: Sequence[EndpointState]) -> EndpointState:
        return candidates[_weighted_index(candidates, self._rng)]


def make_balancer(kind: str, rng: random.Random) -> Balancer:
    if kind == "round-robin":
        return RoundRobin()
    if kind == "least-request":
        return LeastRequest(rng)
    if kind == "random":
        return RandomWeighted(rng)
    raise ValueError(f"unknown balance {kind!r}: expected round-robin, least-request or random")
