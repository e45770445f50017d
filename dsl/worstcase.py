"""Worst-case numbers of one service's policy: how many attempts a call can make, how long it can take.

`explain` prints these per service and mesh analysis multiplies them along call paths, so
the math lives here once. Everything is a pure function of a compiled `ServicePlan` or
`ShardPlan`; nothing is observed at run time.

Definitions (section 10 of the contract, issue 5):

* attempts = retries + 1 + hedges, where `retries` is `retry N` (0 without retry) and
  `hedges` is the hedge's `max` extra copies (0 without hedge). This is the issue's
  definition: the copies a call can put on the upstream when every try fails, counting a
  hedge once per call. (A hedge can in principle fire on each attempt; hedges draw on the
  retry budget and are idempotent-only, and riprap follows the issue's count.)
* For a sharded service every shard has its own resolved policy; the service's numbers
  are those of its worst shard (most attempts, or longest time).
* The backoff before retry k (k = 1 for the first retry) is at most
  `min(max, base * 2**(k-1))` (exponential) or `base` (constant). Jitter `full` and `equal`
  only shorten that; `decorrelated` (min(max, U(base, previous * 3))) is bounded by
  `min(max, base * 3**k)`; `none` is exactly the bound.
* worst-case time = min(timeout, T) where
  T = (retries + 1) * try_limit + sum of the backoff bounds before each retry,
  try_limit = the `per-try` timeout, or the whole `timeout` when there is none.
  Hedges add no time: they run during an attempt and are bounded by the same deadlines.
  The whole-call `timeout` covers retries, backoff and hedges, so it always caps T.
  Not included: a concurrency queue wait (at most `queue-timeout`, spent before the
  deadline starts) and a `fallback service` taken after the call failed; `breakdown`
  reports both so `explain` can say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

from dsl.plan import BackoffSpec, ServicePlan, ShardPlan

PolicyHolder = Union[ServicePlan, ShardPlan]
MAX_LISTED = 1000  # constant backoff terms listed one by one in a Breakdown; the rest are counted


def _scopes(svc: PolicyHolder) -> tuple[PolicyHolder, ...]:
    """The policy scopes of a service: its shards when sharded, else itself."""
    if isinstance(svc, ServicePlan) and svc.shards:
        return tuple(svc.shards)
    return (svc,)


def _own_retries(p: PolicyHolder) -> int:
    return p.retry.retries if p.retry is not None else 0


def _own_hedges(p: PolicyHolder) -> int:
    return p.hedge.max_extra if p.hedge is not None else 0


def _own_attempts(p: PolicyHolder) -> int:
    return _own_retries(p) + 1 + _own_hedges(p)


def _growth(backoff: BackoffSpec) -> tuple[float, int]:
    """The growth factor of a backoff's bound and the power of it for retry 1."""
    if backoff.jitter == "decorrelated":
        return 3.0, 1
    return 2.0, 0


def _saturated(backoff: BackoffSpec, power: int, factor: float) -> bool:
    """Whether base * factor**power reaches the cap (decided without overflowing)."""
    if backoff.base <= 0 or power <= 0:
        return backoff.base >= backoff.max
    if backoff.base >= backoff.max:
        return True
    return power >= math.log(backoff.max / backoff.base, factor)


def backoff_bound(backoff: BackoffSpec | None, retry_number: int) -> float:
    """The longest wait before retry `retry_number` (1 = the first retry); 0 without backoff.

    Once the doubling (tripling for `decorrelated`) passes `max` the bound stays at `max`,
    so the power is never computed past that point: no overflow for any retry number.
    """
    if backoff is None or retry_number < 1:
        return 0.0
    if backoff.kind == "constant":
        return backoff.base
    factor, first = _growth(backoff)
    power = retry_number - 1 + first
    if _saturated(backoff, power, factor):
        return backoff.max
    return min(backoff.max, backoff.base * factor**power)


def backoff_terms(backoff: BackoffSpec | None, retries: int) -> tuple[tuple[float, ...], int]:
    """The bounds before retries 1..`retries`, as (the growing terms, how many more at `max`).

    O(log(max/base)) whatever `retries` is: the terms stop growing at `max`, and the rest
    are counted, not listed. Constant backoff lists every term up to MAX_LISTED.
    """
    if backoff is None or retries < 1:
        return (), 0
    if backoff.kind == "constant":
        listed = min(retries, MAX_LISTED)
        return (backoff.base,) * listed, retries - listed
    terms: list[float] = []
    k = 1
    while k <= retries:
        b = backoff_bound(backoff, k)
        terms.append(b)
        if b >= backoff.max:
            break
        k += 1
    return tuple(terms), retries - len(terms)


def backoff_total(backoff: BackoffSpec | None, retries: int) -> float:
    """The sum of the backoff bounds before retries 1..`retries` (closed form, no loop over N)."""
    if backoff is None or retries < 1:
        return 0.0
    terms, rest = backoff_terms(backoff, retries)
    return sum(terms) + rest * (backoff.base if backoff.kind == "constant" else backoff.max)


def _own_time(p: PolicyHolder) -> float:
    return _breakdown_of(p, None).worst_time


def attempts(svc: PolicyHolder) -> int:
    """retries + 1 + hedge max extra copies; for a sharded service, its worst shard's."""
    return max(_own_attempts(p) for p in _scopes(svc))


def worst_case_time(svc: PolicyHolder) -> float:
    """min(timeout, (retries+1) * (per-try or timeout) + sum of backoff bounds), worst shard.

    Seconds. See the module docstring for what is and is not included.
    """
    return max(_own_time(p) for p in _scopes(svc))


def steady_attempts(svc: PolicyHolder) -> float:
    """Attempts per call once a retry budget is in force: min(attempts, 1 + ratio).

    A budget of P% lets retries and hedges add at most P% to the calls over its window, so in
    steady state a call costs about 1 + P/100 attempts. The budget's floor (`min R/s`) still
    lets R retries per second through, so at low traffic the worst case stays `attempts`.
    Without a budget this is `attempts`. Worst shard for a sharded service.
    """
    best = 0.0
    for p in _scopes(svc):
        full = float(_own_attempts(p))
        if p.retry is not None and p.retry.budget is not None:
            full = min(full, 1.0 + p.retry.budget.ratio)
        best = max(best, full)
    return best


@dataclass(frozen=True)
class Breakdown:
    """The terms behind `attempts` and `worst_case_time`, for `explain` to print."""

    shard: str | None  # the worst shard of a sharded service, else None
    retries: int
    hedges: int
    attempts: int
    timeout: float
    per_try: float | None
    try_limit: float  # per_try, or timeout when there is none
    backoffs: tuple[float, ...]  # the bound before each retry, up to where it stops changing
    backoffs_more: int  # retries after `backoffs`, each waiting the last bound (`max`)
    uncapped: float  # (retries + 1) * try_limit + sum(backoffs)
    worst_time: float  # min(timeout, uncapped)
    budget_ratio: float | None  # retry budget as a fraction, when one is set
    steady_attempts: float  # attempts with the budget in force
    queue_wait: float  # concurrency queue-timeout when a queue is configured, else 0
    fallback_services: tuple[str, ...]  # `fallback service` targets, taken after a failure

    @property
    def capped_by_timeout(self) -> bool:
        return self.uncapped > self.timeout

    def formula(self) -> str:
        """The time formula with its numbers, e.g. `min(2s, 4 × 600ms + 100ms + 200ms + 400ms) = 2s`."""
        tries = f"{self.retries + 1} × {fmt_seconds(self.try_limit)}"
        parts = [tries] + [fmt_seconds(b) for b in self.backoffs if b > 0]
        if self.backoffs_more and self.backoffs and self.backoffs[-1] > 0:
            parts.append(f"{self.backoffs_more} × {fmt_seconds(self.backoffs[-1])}")
        return (
            f"min({fmt_seconds(self.timeout)}, {' + '.join(parts)}) = {fmt_seconds(self.worst_time)}"
        )

    def lines(self) -> list[str]:
        """Plain-words lines: attempts, time, and what the time leaves out."""
        where = f" (shard {self.shard})" if self.shard else ""
        out = [
            f"worst-case attempts{where}: {self.attempts} "
            f"= {self.retries} retries + 1 + {self.hedges} hedges",
            f"worst-case time{where}: {self.formula()}",
        ]
        if self.budget_ratio is not None:
            out.append(
                f"with the retry budget of {self.budget_ratio * 100:g}%: about "
                f"{self.steady_attempts:g} attempts per call in steady state"
            )
        if self.queue_wait > 0:
            out.append(f"plus up to {fmt_seconds(self.queue_wait)} waiting in the concurrency queue")
        if self.fallback_services:
            out.append(
                "plus the fallback service's own time after a failure: "
                + ", ".join(self.fallback_services)
            )
        return out


def _breakdown_of(p: PolicyHolder, shard: str | None) -> Breakdown:
    retries = _own_retries(p)
    per_try = p.retry.per_try_timeout if p.retry is not None else None
    try_limit = min(per_try, p.timeout) if per_try is not None else p.timeout
    backoff = p.retry.backoff if p.retry is not None else None
    backoffs, more = backoff_terms(backoff, retries)
    if more and len(backoffs) < MAX_LISTED and backoff is not None and backoff.kind != "constant":
        # list the saturated terms too while they are few (explain's formula shows each)
        extra = min(more, MAX_LISTED - len(backoffs))
        backoffs, more = backoffs + (backoffs[-1],) * extra, more - extra
    uncapped = (retries + 1) * try_limit + backoff_total(backoff, retries)
    budget = p.retry.budget if p.retry is not None else None
    full = _own_attempts(p)
    conc = p.concurrency
    return Breakdown(
        shard=shard,
        retries=retries,
        hedges=_own_hedges(p),
        attempts=full,
        timeout=p.timeout,
        per_try=per_try,
        try_limit=try_limit,
        backoffs=backoffs,
        backoffs_more=more,
        uncapped=uncapped,
        worst_time=min(p.timeout, uncapped),
        budget_ratio=budget.ratio if budget is not None else None,
        steady_attempts=min(float(full), 1.0 + budget.ratio) if budget is not None else float(full),
        queue_wait=conc.queue_timeout if conc is not None and conc.queue > 0 else 0.0,
        fallback_services=tuple(f.service for f in p.fallbacks if f.kind == "service" and f.service),
    )


def breakdown(svc: PolicyHolder) -> Breakdown:
    """The numbers behind the worst case; for a sharded service, its worst shard's.

    The worst shard is the one with the longest worst-case time, ties broken by attempts,
    then by declaration order.
    """
    scopes = _scopes(svc)
    if len(scopes) == 1 and scopes[0] is svc:
        return _breakdown_of(svc, None)
    found = [_breakdown_of(p, getattr(p, "name", None)) for p in scopes]
    return max(found, key=lambda b: (b.worst_time, b.attempts))


def fmt_seconds(seconds: float) -> str:
    """A duration the way a policy file writes it: 600ms, 2s, 1.5s, 5m."""
    if seconds == 0:
        return "0s"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.4g}us"
    if seconds < 1:
        return f"{seconds * 1e3:.4g}ms"
    if seconds < 60 or seconds % 60:
        return f"{seconds:.4g}s"
    if seconds < 3600 or seconds % 3600:
        return f"{seconds / 60:.4g}m"
    return f"{seconds / 3600:.4g}h"
