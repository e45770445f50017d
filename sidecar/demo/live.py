"""The live view: refreshed every second while the demo runs.

On a terminal it is a rich panel (success and p99 per service over the last five
seconds, with and without riprap; breakers, ejections, fallbacks, retries, hedges; the
chaos step in force). When stdout is not a terminal (CI, a pipe) it prints one plain line
per second instead, so logs stay readable.
"""

from __future__ import annotations

from typing import Sequence

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sidecar.demo.chaos import Step, step_at
from sidecar.demo.sidecar_view import SidecarView
from sidecar.demo.stats import DEPS, Call, fmt_ms, fmt_pct, rates, window

WINDOW = 5.0


def _step_text(steps: list[Step], t: float) -> str:
    step = step_at(steps, t)
    if step is None:
        return "calm (warming up caches)"
    return f"step {steps.index(step) + 1}/{len(steps)}: {step.title}"


def _riprap_lines(view: SidecarView) -> list[str]:
    if view.error:
        return [f"sidecar admin: {view.error}"]
    open_ = [k for k, v in sorted(view.breakers.items()) if v != "closed"]
    fb: dict[str, float] = {}
    for (_, kind), n in view.fallbacks.items():
        fb[kind] = fb.get(kind, 0) + n
    ejected = sorted({f"{s} {e}" for (s, e), n in view.ejections.items() if n > 0})
    return [
        f"breakers not closed: {', '.join(f'{k} {view.breakers[k]}' for k in open_) or 'none'}",
        f"unhealthy endpoints: {', '.join(view.unhealthy) or 'none'}",
        f"ejected now: {', '.join(view.ejected_now) or 'none'}   "
        f"(ever: {', '.join(ejected) or 'none'})",
        "fallbacks served: " + (", ".join(f"{k} {int(v)}" for k, v in sorted(fb.items())) or "0")
        + f"   retries: {int(view.total(view.retries))}   hedges: {int(view.total(view.hedges))}",
    ]


def render(calls: Sequence[Call], t: float, duration: float, steps: list[Step],
           view: SidecarView) -> Panel:
    recent = rates(window(calls, max(0.0, t - WINDOW - 1.0), t))
    table = Table(box=None, pad_edge=False, expand=False)
    table.add_column("last 5 s", style="bold")
    table.add_column("with riprap", justify="right")
    table.add_column("p99", justify="right")
    table.add_column("without riprap", justify="right")
    table.add_column("p99", justify="right")
    for svc in ("checkout",) + DEPS:
        cells: list[str | Text] = [svc]
        for target in ("riprap", "baseline"):
            r = recent.get((target, svc))
            pct = r.success if r else None
            style = "green" if pct is not None and pct >= 99 else (
                "yellow" if pct is not None and pct >= 90 else "red")
            cells += [Text(fmt_pct(pct), style=style), fmt_ms(r.p(99) if r else None)]
        table.add_row(*cells)
    head = Text.assemble(("chaos: ", "bold"), (_step_text(steps, t), "magenta"),
                         f"    {t:4.0f}/{duration:.0f} s")
    body = Text("\n".join(_riprap_lines(view)), style="cyan")
    return Panel(Group(head, Text(""), table, Text(""), body),
                 title="riprap demo: the checkout under fire", border_style="blue")


def plain_line(calls: Sequence[Call], t: float, steps: list[Step], view: SidecarView) -> str:
    recent = rates(window(calls, max(0.0, t - WINDOW - 1.0), t))
    parts = [f"[{t:5.1f}s] {_step_text(steps, t)}"]
    for target, label in (("riprap", "with riprap"), ("baseline", "without")):
        r = recent.get((target, "checkout"))
        parts.append(f"{label}: {fmt_pct(r.success if r else None)} p99 "
                     f"{fmt_ms(r.p(99) if r else None)}")
    if not view.error:
        open_ = [k for k, v in view.breakers.items() if v != "closed"]
        fb = int(sum(view.fallbacks.values()))
        parts.append(f"retries {int(view.total(view.retries))} hedges "
                     f"{int(view.total(view.hedges))} fallbacks {fb} open breakers "
                     f"{','.join(open_) or '-'}")
    return " | ".join(parts)
