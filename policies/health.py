"""Endpoint health: active checks with rise/fall, passive outlier ejection, tiers, panic.

`EndpointState` is the mutable record of one endpoint that the other pieces read and
write: the balancer reads `weight` and `in_flight`, `ActiveHealth` flips `healthy`,
`OutlierDetector` sets `ejected_until`. `select_tier` combines them into the
endpoints a call may use, falling back tier by tier, and to panic (the primaries,
usable or not) when no tier has a usable endpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dsl.plan import EndpointSpec, HealthSpec, OutlierSpec
from policies.clock import Clock


@dataclass(slots=True, eq=False)
class EndpointState:
    """One endpoint's live state. Endpoints start healthy: traffic flows before the
    first check, and the fall counter takes them out (as nginx does without `mandatory`)."""

    url: str
    weight: int = 1
    tier: int = 0
    in_flight: int = 0
    healthy: bool = True  # active health status
    rise_count: int = 0  # consecutive passing checks while unhealthy
    fall_count: int = 0  # consecutive failing checks while healthy
    next_check: float = 0.0  # clock time the next active check is due
    consecutive_failures: int = 0  # passive (outlier) failures in a row
    ejections: int = 0  # times ejected so far
    ejected_until: float = 0.0  # clock time the current ejection ends (0: never ejected)

    @classmethod
    def from_spec(cls, spec: EndpointSpec) -> EndpointState:
        return cls(url=spec.url, weight=spec.weight, tier=spec.tier)

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def snapshot(self, now: float) -> dict[str, object]:
        return {
            "url": self.url,
            "weight": self.weight,
            "tier": self.tier,
            "in_flight": self.in_flight,
            "healthy": self.healthy,
            "ejected": self.ejected(now),
            "ejections": self.ejections,
            "ejected_for": max(0.0, self.ejected_until - now),
            "consecutive_failures": self.consecutive_failures,
        }


class ActiveHealth:
    """The rise/fall state machine of active checks, and their schedule.

    An endpoint turns unhealthy after `fall` failed checks in a row and healthy again
    after `rise` passing checks in a row. The check loop itself (I/O) lives elsewhere:
    it asks `due`, runs the check, classifies it with `expects`, and calls `observe`.
    """

    __slots__ = ("spec", "_codes", "_classes")

    def __init__(self, spec: HealthSpec) -> None:
        if spec.fall < 1 or spec.rise < 1:
            raise ValueError(f"health fall and rise must be at least 1 (fall {spec.fall}, rise {spec.rise})")
        if spec.interval <= 0:
            raise ValueError(f"health interval must be positive, got {spec.interval}")
        self.spec = spec
        codes: set[int] = set()
        classes: set[int] = set()
        for e in spec.expect:
            e = e.strip().lower()
            if len(e) == 3 and e.endswith("xx") and e[0] in "12345":
                classes.add(int(e[0]))
            elif len(e) == 3 and e.isdigit():
                codes.add(int(e))
            else:
                raise ValueError(f"health expect {e!r} is not a status such as 200 or a class such as 2xx")
        self._codes = frozenset(codes)
        self._classes = frozenset(classes)

    def expects(self, status: int) -> bool:
        """Does a check answered with `status` pass?"""
        return status in self._codes or (status // 100) in self._classes

    def due(self, endpoint: EndpointState, now: float) -> bool:
        return now >= endpoint.next_check

    def observe(self, endpoint: EndpointState, ok: bool, now: float) -> bool:
        """Record one check result; True when the endpoint's health changed."""
        endpoint.next_check = now + self.spec.interval
        if ok:
            endpoint.fall_count = 0
            if endpoint.healthy:
                return False
            endpoint.rise_count += 1
            if endpoint.rise_count >= self.spec.rise:
                endpoint.healthy = True
                endpoint.rise_count = 0
                return True
            return False
        endpoint.rise_count = 0
        if not endpoint.healthy:
            return False
        endpoint.fall_count += 1
        if endpoint.fall_count >= self.spec.fall:
            endpoint.healthy = False
            endpoint.fall_count = 0
            return True
        return False


class OutlierDetector:
    """Passive ejection after `failures` consecutive failed calls of one endpoint.

    The n-th ejection lasts `eject * n`. At most `max_fraction` of a tier is ejected at
    once, except that one endpoint may always be ejected when none of its tier is (as
    Envoy does): otherwise a lone primary could never be ejected and its failover tier
    never used. `max 0%` turns ejection off. An endpoint over the cap stays in, and is
    ejected on its next failure if room appeared. Outcomes of an ejected endpoint
    (reached in panic) are not counted.
    """

    __slots__ = ("spec", "_clock")

    def __init__(self, spec: OutlierSpec, clock: Clock) -> None:
        if spec.failures < 1:
            raise ValueError(f"outlier failures must be at least 1, got {spec.failures}")
        if spec.eject < 0 or not 0.0 <= spec.max_fraction <= 1.0:
            raise ValueError(f"outlier eject must be >= 0 and max within 0..100% ({spec.eject}, {spec.max_fraction})")
        self.spec = spec
        self._clock = clock

    def record(
        self, endpoint: EndpointState, ok: bool, tier_members: Sequence[EndpointState]
    ) -> bool:
        """Record one call outcome; True when this failure ejected the endpoint."""
        if ok:
            endpoint.consecutive_failures = 0
            return False
        now = self._clock.now()
        if now < endpoint.ejected_until:
            return False
        endpoint.consecutive_failures += 1
        if endpoint.consecutive_failures < self.spec.failures:
            return False
        ejected = 0
        size = 0
        for m in tier_members:
            if m.tier == endpoint.tier:
                size += 1
                if m is not endpoint and now < m.ejected_until:
                    ejected += 1
        if endpoint not in tier_members:
            size += 1
        cap = self.spec.max_fraction
        if cap <= 0.0 or (ejected and ejected + 1 > cap * size + 1e-9):
            return False
        endpoint.ejections += 1
        endpoint.ejected_until = now + self.spec.eject * endpoint.ejections
        endpoint.consecutive_failures = 0
        return True


def usable(endpoint: EndpointState, now: float) -> bool:
    """Healthy (active checks) and not ejected (outlier detection)."""
    return endpoint.healthy and now >= endpoint.ejected_until


def select_tier(
    endpoints: Sequence[EndpointState],
    now: float,
    is_broken: Callable[[EndpointState], bool] | None = None,
) -> tuple[list[EndpointState], bool]:
    """The usable endpoints of the lowest tier that has any, and a panic flag.

    When no tier has a usable endpoint, the lowest tier's endpoints (the primaries) are
    returned with panic=True: trying them anyway beats failing every call (Envoy's
    panic threshold); the caller skips panic when the service has a fallback.
    """
    best_tier: int | None = None
    chosen: list[EndpointState] = []
    lowest: int | None = None
    for ep in endpoints:
        tier = ep.tier
        if lowest is None or tier < lowest:
            lowest = tier
        if best_tier is not None and tier > best_tier:
            continue
        if not (ep.healthy and now >= ep.ejected_until):
            continue
        if is_broken is not None and is_broken(ep):
            continue
        if best_tier is None or tier < best_tier:
            best_tier = tier
            chosen = [ep]
        else:
            chosen.append(ep)
    if best_tier is not None:
        return chosen, False
    return [ep for ep in endpoints if ep.tier == lowest], True
