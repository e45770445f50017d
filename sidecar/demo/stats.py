"""What the demo measured, in numbers: percentiles, per-second series, per-step tables.

Pure functions over the list of calls the traffic generator recorded, so the live view,
the summary and the HTML report all tell the same story from the same data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

DEPS = ("payments", "inventory", "recommendations")
TARGETS = ("riprap", "baseline")


@dataclass
class Call:
    """One checkout call as the client saw it."""

    target: str  # "riprap" | "baseline"
    t: float  # scheduled send time, seconds since the traffic started
    ms: float  # latency as the client saw it
    status: int  # 0: no HTTP answer (refused, reset, client timeout)
    error: str | None = None
    deps: dict[str, dict[str, Any]] | None = None  # checkout's account of its calls

    @property
    def ok(self) -> bool:
        return self.status == 200


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered) / 100.0 - 1e-9))  # float-safe nearest rank
    return ordered[min(rank, len(ordered)) - 1]


def dep_ok(name: str, doc: dict[str, Any]) -> bool:
    """A dependency call served the checkout: a 2xx (a fallback's 2xx counts: degraded, not failed)."""
    return 200 <= int(doc.get("status") or 0) < 300


@dataclass
class Rate:
    ok: int = 0
    total: int = 0
    latencies: list[float] = field(default_factory=list)

    def add(self, ok: bool, ms: float) -> None:
        self.total += 1
        self.ok += int(ok)
        self.latencies.append(ms)

    @property
    def success(self) -> float | None:
        return 100.0 * self.ok / self.total if self.total else None

    def p(self, q: float) -> float | None:
        return percentile(self.latencies, q)


def rates(calls: Iterable[Call]) -> dict[tuple[str, str], Rate]:
    """Success and latency per (target, service), service 'checkout' being the call itself."""
    out: dict[tuple[str, str], Rate] = {}
    for c in calls:
        out.setdefault((c.target, "checkout"), Rate()).add(c.ok, c.ms)
        for name, doc in (c.deps or {}).items():
            out.setdefault((c.target, name), Rate()).add(dep_ok(name, doc), float(doc.get("ms", 0)))
    return out


def window(calls: Sequence[Call], start: float, end: float) -> list[Call]:
    return [c for c in calls if start <= c.t < end]


def per_second(calls: Sequence[Call], target: str, duration: float
               ) -> list[tuple[float, float | None, float | None]]:
    """(second, success %, p99 ms) for each whole second of the run."""
    buckets: dict[int, Rate] = {}
    for c in calls:
        if c.target == target:
            buckets.setdefault(int(c.t), Rate()).add(c.ok, c.ms)
    series = []
    for s in range(int(math.ceil(duration))):
        r = buckets.get(s)
        series.append((float(s), r.success if r else None, r.p(99) if r else None))
    return series


@dataclass(frozen=True)
class Mechanisms:
    """How many riprap-side calls each mechanism carried (from checkout's per-call account)."""

    payment_retries: int  # payment calls that needed more than one attempt and succeeded
    payment_failover: int  # payment calls answered by the backup provider
    inventory_retries: int
    inventory_stale: int  # stock answered from the stale cache
    recs_fallback_static: int
    recs_fallback_stale: int
    recs_hedged_or_retried: int
    checkout_refused: int  # calls that found no checkout process (killed, restarting)
    failed_other: int


def mechanisms(calls: Iterable[Call]) -> Mechanisms:
    pr = pf = ir = ist = rfs = rfst = rr = refused = other = 0
    for c in calls:
        if c.target != "riprap":
            continue
        if c.deps is None:
            refused += int(not c.ok)
            continue
        if not c.ok:
            other += 1
        pay = c.deps.get("payments", {})
        inv = c.deps.get("inventory", {})
        rec = c.deps.get("recommendations", {})
        if dep_ok("payments", pay):
            pr += int(_attempts(pay) > 1)
            pf += int(str(pay.get("server") or "").endswith("backup"))
        if dep_ok("inventory", inv):
            ist += int(inv.get("fallback") == "stale")
            ir += int(_attempts(inv) > 1 and inv.get("fallback") is None)
        if dep_ok("recommendations", rec):
            rfs += int(rec.get("fallback") == "static")
            rfst += int(rec.get("fallback") == "stale")
            rr += int(_attempts(rec) > 1 and rec.get("fallback") is None)
    return Mechanisms(pr, pf, ir, ist, rfs, rfst, rr, refused, other)


def _attempts(doc: dict[str, Any]) -> int:
    try:
        return int(doc.get("attempts") or 1)
    except (TypeError, ValueError):
        return 1


def fmt_pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} %" if v < 99.95 or v == 100.0 else f"{v:.2f} %"


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.0f} ms" if v >= 10 else f"{v:.1f} ms")
