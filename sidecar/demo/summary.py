"""The end of the demo: checkout with riprap beside the same traffic and faults without it,
per chaos step, and which mechanism carried which calls.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text

from sidecar.demo.chaos import Step
from sidecar.demo.sidecar_view import SidecarView
from sidecar.demo.stats import Call, Mechanisms, fmt_ms, fmt_pct, mechanisms, rates, window


def phases(steps: Sequence[Step], duration: float) -> list[tuple[str, float, float]]:
    """(label, start, end) for the calm start and each step until the next one."""
    out = [("calm", 0.0, steps[0].at if steps else duration)]
    for i, s in enumerate(steps):
        end = steps[i + 1].at if i + 1 < len(steps) else duration
        out.append((f"{i + 1}. {s.title}", s.at, end))
    return out


def summarise(calls: Sequence[Call], steps: Sequence[Step], duration: float,
              view: SidecarView, restarts: int, pids: Sequence[int]) -> dict[str, Any]:
    """Everything the summary, the report and `--json` show, as plain data."""
    total = rates(calls)
    doc: dict[str, Any] = {"duration": duration, "targets": {}, "phases": [],
                           "mechanisms": asdict(mechanisms(calls)), "restarts": restarts,
                           "processes": list(pids)}
    for target in ("riprap", "baseline"):
        r = total.get((target, "checkout"))
        doc["targets"][target] = {
            "calls": r.total if r else 0, "ok": r.ok if r else 0,
            "success": r.success if r else None,
            "p50_ms": r.p(50) if r else None, "p99_ms": r.p(99) if r else None,
            "services": {svc: {"success": rr.success, "p99_ms": rr.p(99)}
                         for (t, svc), rr in total.items() if t == target},
        }
    for label, start, end in phases(steps, duration):
        w = rates(window(calls, start, end))
        row: dict[str, Any] = {"phase": label, "start": start, "end": end}
        for target in ("riprap", "baseline"):
            r = w.get((target, "checkout"))
            row[target] = {"success": r.success if r else None, "p99_ms": r.p(99) if r else None}
        doc["phases"].append(row)
    doc["failures"] = {t: failure_reasons(calls, t) for t in ("riprap", "baseline")}
    doc["sidecar"] = {
        "retries": view.total(view.retries), "hedges": view.total(view.hedges),
        "retries_refused": {f"{s}/{w}": v for (s, w), v in view.retries_refused.items()},
        "fallbacks": {f"{s}/{k}": v for (s, k), v in view.fallbacks.items()},
        "ejections": {f"{s} {e}": v for (s, e), v in view.ejections.items()},
        "breaker_opens": dict(view.breaker_opens), "error": view.error,
    }
    return doc


def failure_reasons(calls: Sequence[Call], target: str) -> dict[str, int]:
    """Why the failed checkout calls failed: 'payments 502 upstream-failed', 'checkout refused'..."""
    out: dict[str, int] = {}
    for c in calls:
        if c.target != target or c.ok:
            continue
        if c.deps is None:
            key = f"checkout {c.error or c.status}"
        else:
            bad = [f"{n} {d.get('status')} {d.get('reason') or ''} after "
                   f"{d.get('attempts') or '?'} attempt(s)"
                   for n, d in c.deps.items() if n != "recommendations" and not d.get("ok")]
            key = "; ".join(bad) or f"checkout {c.status}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def explain(m: Mechanisms, doc: dict[str, Any], steps: Sequence[Step]) -> list[str]:
    """Which mechanism saved which calls, in words."""
    sc = doc["sidecar"]
    lines = [
        f"retries: {m.payment_retries} payments and {m.inventory_retries} inventory calls "
        f"succeeded on a later attempt ({int(sc['retries'])} retries in all).",
        f"failover: {m.payment_failover} payments went to the backup provider when no "
        "replica was healthy.",
        f"outlier ejection: {len([v for v in sc['ejections'].values() if v])} endpoint(s) "
        f"ejected ({int(sum(sc['ejections'].values()))} times).",
        f"breakers: opened {int(sum(sc['breaker_opens'].values()))} times "
        f"({', '.join(sorted(sc['breaker_opens'])) or 'none'}), failing fast instead of waiting.",
        f"stale cache: {m.inventory_stale} stock reads answered from the last good answer.",
        f"fallbacks: {m.recs_fallback_stale} stale and {m.recs_fallback_static} static "
        f"recommendation lists kept checkout fast; {int(sc['hedges'])} hedges sent.",
        f"supervisor: {doc['restarts']} restart(s) of the checkout process; {m.checkout_refused} "
        "calls arrived while it was down.",
    ]
    for s in steps:
        lines.append(f"  step '{s.title}': {s.saves}")
    return lines


def render(doc: dict[str, Any], steps: Sequence[Step]) -> Group:
    t = Table(title="checkout: the same traffic and faults", title_justify="left")
    t.add_column("")
    t.add_column("with riprap", justify="right")
    t.add_column("without riprap", justify="right")
    rp, bl = doc["targets"]["riprap"], doc["targets"]["baseline"]
    t.add_row("success", fmt_pct(rp["success"]), fmt_pct(bl["success"]))
    t.add_row("calls ok / sent", f"{rp['ok']} / {rp['calls']}", f"{bl['ok']} / {bl['calls']}")
    t.add_row("p50", fmt_ms(rp["p50_ms"]), fmt_ms(bl["p50_ms"]))
    t.add_row("p99", fmt_ms(rp["p99_ms"]), fmt_ms(bl["p99_ms"]))
    p = Table(title="per chaos step (checkout success, p99)", title_justify="left")
    p.add_column("step")
    p.add_column("with riprap", justify="right")
    p.add_column("without riprap", justify="right")
    for row in doc["phases"]:
        p.add_row(row["phase"],
                  f"{fmt_pct(row['riprap']['success'])}  {fmt_ms(row['riprap']['p99_ms'])}",
                  f"{fmt_pct(row['baseline']['success'])}  {fmt_ms(row['baseline']['p99_ms'])}")
    m = Mechanisms(**doc["mechanisms"])
    words = Text("\n".join(["What saved the calls:"] + explain(m, doc, steps)))
    return Group(t, Text(""), p, Text(""), words)
