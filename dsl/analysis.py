"""Mesh analysis (contract section 10): findings over compiled files taken together, and per file.

`riprap check` calls `analyse` after compiling every file (one file too); `riprap explain`
with several files appends `explain_mesh`. Findings (codes in docs/analysis.md):

- RP401 retry amplification (warning): a path from an entry app whose product of attempts
  exceeds `max_amplification`. The threshold applies to the worst case *without* budgets:
  a budget's floor (`min`, default 10/s) lets every retry through at low traffic, which is
  when an outage starts. The message also gives the steady-state figure with budgets.
- RP402 deadline inversion (warning): a caller waits less for a callee (its timeout, or its
  per-try timeout when that is shorter) than the callee can keep working for one of its
  own dependencies.
- RP403 call cycle (error) and RP404 fallback cycle (error).
- RP405 breaker that can never trip (failure-rate 100% with slow calls off; `min` above
  `window` is the checker's error RP216) and RP406 hedge on a service whose retry
  conditions can never match (warnings, per file). A limit burst below one token cannot
  reach analysis: the language takes whole numbers of at least 1 (RP101, RP222) and the
  default burst is max(1, rate).
- RP407 two files declare the same app (warning): the first file keeps the name.

The mesh joins only units with a plan (files without errors). The one-file findings
(RP404-RP406) are also made on a file with errors, over the services its errors leave
intact (`CompiledUnit.resolved`), since every problem in a file is reported; for such a
file this also reports the compiler's plan-level warnings (`CompiledUnit.findings`).
"""

from __future__ import annotations

import re
from typing import Sequence

from dsl import mesh as m
from dsl.diagnostics import Diagnostic, Span, sort_key
from dsl.plan import Plan, ServicePlan, ShardPlan
from dsl.units import CompiledUnit
from dsl.worstcase import breakdown, fmt_seconds

# A retry condition that can never match a failed attempt: a 1xx, 2xx or 3xx status.
_NEVER_FAILS = re.compile(r"^[123](\d\d|xx)$")
_EPSILON = 1e-9  # seconds: float sums of durations are compared with this slack


def analyse(units: Sequence[CompiledUnit], max_amplification: float = 10.0) -> list[Diagnostic]:
    """Findings over the compiled files taken together (and per file), sorted by place."""
    diags: list[Diagnostic] = []
    for u in units:
        if u.plan is None:
            diags.extend(u.findings)  # plan-level warnings on the intact part of a broken file
        if _resolved(u) is not None:
            diags.extend(file_findings(u))
    mesh = m.build(units)
    diags.extend(_duplicates(mesh))
    diags.extend(call_cycles(mesh))
    diags.extend(amplification(mesh, max_amplification))
    diags.extend(inversions(mesh))
    return sorted(diags, key=sort_key)


# ---- mesh findings --------------------------------------------------------------------


def _app_span(u: CompiledUnit) -> Span:
    return u.app_span or Span(u.path, 1, 1)


def _duplicates(mesh: m.Mesh) -> list[Diagnostic]:
    out = []
    for first, dup in mesh.duplicates:
        assert dup.plan is not None
        out.append(
            Diagnostic(
                "RP407",
                "warning",
                _app_span(dup),
                f"app '{dup.plan.app}' is also declared in {first.path}; "
                f"the mesh joins calls to '{dup.plan.app}' to that file and leaves this one out",
                hint="give each file its own `app NAME`",
            )
        )
    return out


def call_cycles(mesh: m.Mesh) -> list[Diagnostic]:
    """RP403: one error per cycle of apps calling each other, at the first hop's `service` line."""
    out = []
    succ = m.call_successors(mesh)
    for cyc in m.cycles(mesh.nodes, succ):
        names = [m.node_name(n) for n in cyc]
        first = next(e for e in mesh.out[cyc[0]] if e.target == cyc[1 % len(cyc)])
        loop = " → ".join(names + [names[0]])
        out.append(
            Diagnostic(
                "RP403",
                "error",
                first.span,
                f"call cycle: {loop}; a failure or a retry anywhere on it comes back around "
                "and multiplies without end",
                hint="break the cycle: one of these apps must not call back up the chain",
            )
        )
    return out


def amplification(mesh: m.Mesh, limit: float) -> list[Diagnostic]:
    """RP401: for each entry app and each node it reaches, the worst path when its product exceeds `limit`."""
    out = []
    skip = m.cycle_edges(mesh)
    for entry in mesh.entries():
        for target, res in m.worst_paths(mesh, entry, skip).items():
            if res.amplification <= limit:
                continue
            out.append(_amplification_diag(res, entry, target))
    return out


def _amplification_diag(res: m.PathResult, entry: str, target: str) -> Diagnostic:
    last = res.edges[-1]
    worst_hop = max(res.edges, key=lambda e: e.attempts)
    msg = (
        f"retry amplification: {res.describe()} attempts on {m.node_name(target)} "
        f"per {m.node_name(entry)} call"
    )
    budgeted = [e for e in res.edges if e.steady < e.attempts]
    if budgeted:
        factors = " × ".join(f"{e.steady:g}" for e in res.edges)
        # one hop: its factor is the product (no `1.2 ≈ 1.2`)
        product = f"{factors} ≈ {res.steady:.3g}" if len(res.edges) > 1 else f"{res.steady:.3g}"
        msg += (
            f"; with the retry budgets on this path about {product} "
            "in steady state, but a budget's floor lets every retry through at low traffic"
        )
    hint = (
        f"the largest factor is {worst_hop.caller} → {worst_hop.name} ({worst_hop.attempts} attempts); "
        "retry at one layer only (usually the one nearest the failing service), "
        "lower `retry N`, or raise --max-amplification"
    )
    return Diagnostic("RP401", "warning", last.span, msg, hint=hint)


def inversions(mesh: m.Mesh) -> list[Diagnostic]:
    """RP402: a caller gives up on an app before that app can finish with its own dependencies."""
    out = []
    for e in mesh.edges():
        if not e.target.startswith("app:"):
            continue
        callee = m.node_name(e.target)
        worst, inner = m.callee_worst(mesh, callee)
        if inner is None or e.limit + _EPSILON >= worst:  # 3 × 0.8 + 0.3 is 2.7000000000000006
            continue
        waits = "per-try timeout" if e.limit_kind == "per-try" else "timeout"
        extra = m.fallback_time(inner)
        inner_b = breakdown(inner.service)
        how = inner_b.formula()
        if extra:
            how += f", then {fmt_seconds(extra)} of fallback service"
        msg = (
            f"deadline inversion: {e.caller} → {callee} → {inner.name}: {e.caller}'s {waits} for "
            f"{callee} is {fmt_seconds(e.limit)}, but {callee} can keep working on {inner.name} "
            f"for {fmt_seconds(worst)} ({callee}'s timeout {fmt_seconds(inner_b.timeout)} "
            f"for {inner.name}: {how})"
        )
        hint = (
            f"raise {e.caller}'s {waits} for {callee} above {fmt_seconds(worst)}, or lower "
            f"{callee}'s timeout or retries for {inner.name} below {fmt_seconds(e.limit)}"
        )
        out.append(Diagnostic("RP402", "warning", e.span, msg, hint=hint))
    return out


# ---- single-file findings -------------------------------------------------------------


def _resolved(u: CompiledUnit) -> Plan | None:
    """The plan, or for a file with errors the partial plan of its intact services."""
    return u.plan if u.plan is not None else u.resolved


def file_findings(u: CompiledUnit) -> list[Diagnostic]:
    """RP404-RP406 and RP408 in one file: fallback cycles, breakers, hedges, failover."""
    plan = _resolved(u)
    assert plan is not None
    out = fallback_cycles(u)
    for svc in plan.services.values():
        span = u.service_spans.get(svc.name) or _app_span(u)
        scopes: list[tuple[str, ServicePlan | ShardPlan]] = [(f"service '{svc.name}'", svc)]
        scopes += [(f"shard '{s.name}' of service '{svc.name}'", s) for s in svc.shards]
        said: set[tuple[object, ...]] = set()
        for where, p in scopes:
            for key, d in _scope_findings(where, p, span):
                if key not in said:  # a shard inherits its service's lines: say it once
                    said.add(key)
                    out.append(d)
    return out


def _scope_findings(
    where: str, p: ServicePlan | ShardPlan, span: Span
) -> list[tuple[tuple[object, ...], Diagnostic]]:
    """Findings of one policy scope, each keyed by the spec that causes it (for de-duplication)."""
    out: list[tuple[tuple[object, ...], Diagnostic]] = []

    def add(key: tuple[object, ...], code: str, message: str, hint: str) -> None:
        out.append((key, Diagnostic(code, "warning", span, message, hint=hint)))

    b = p.breaker
    if b is not None and b.kind == "rate":
        if b.rate is not None and b.rate >= 1.0 and b.slow is None:
            add(
                ("rate", b),
                "RP405",
                f"breaker on {where} can never trip in practice: failure-rate 100% needs every "
                f"one of the last {b.window} calls to fail, and with slow calls off one answer "
                "in between keeps it closed",
                "use a rate below 100% (50% is common), or add `slow D` so slow calls count",
            )
    r = p.retry
    if (p.health is None and p.outlier is None and (r is None or r.retries == 0)
            and any(e.tier > 0 for e in p.endpoints)
            # a looked-up tier can empty itself (NXDOMAIN): the next tier is then used
            and not any(e.resolve is not None and e.tier < max(x.tier for x in p.endpoints)
                        for e in p.endpoints)):
        add(
            ("failover", p.endpoints),
            "RP408",
            f"the failover endpoints of {where} can never be used: a tier takes calls only "
            "when every endpoint before it is unhealthy, ejected or broken, and nothing here "
            "finds that out (no `health`, `outlier` or `retry`)",
            "add `health GET /healthz` or `outlier failures 5`, or a `retry` (a retry moves "
            "to the next tier once every endpoint of a tier failed the call)",
        )
    if p.hedge is not None and r is not None and r.on and all(_NEVER_FAILS.match(c) for c in r.on):
        add(
            ("hedge", p.hedge, r),
            "RP406",
            f"hedge on {where} sends extra copies of calls, but its retry statement retries "
            f"only on {', '.join(r.on)}, which never mark a try as failed: the retry repeats "
            "nothing, and the hedge repeats calls anyway",
            "retry on real failures (connect-failure, reset, 5xx), or remove the hedge if "
            "repeating calls is unsafe here",
        )
    return out


def fallback_cycles(u: CompiledUnit) -> list[Diagnostic]:
    """RP404: services whose `fallback service` chains lead back to themselves."""
    plan = _resolved(u)
    assert plan is not None
    services = plan.services
    succ = {
        name: [t for t in m.fallback_targets(svc) if t in services] for name, svc in services.items()
    }
    out = []
    for cyc in m.cycles(list(services), succ):
        loop = " → ".join(cyc + [cyc[0]])
        out.append(
            Diagnostic(
                "RP404",
                "error",
                u.service_spans.get(cyc[0]) or _app_span(u),
                f"fallback cycle: {loop}; a failed call would be handed round this chain",
                hint="end the chain with a static answer (`fallback status ...`) "
                "or `fallback stale D` instead of a service that falls back here",
            )
        )
    return out


# ---- explain --------------------------------------------------------------------------


def explain_mesh(units: Sequence[CompiledUnit]) -> str:
    """Each app's worst-case fan-out and time, in words; entry apps first."""
    mesh = m.build(units)
    if not mesh.apps:
        return ""
    skip = m.cycle_edges(mesh)
    entries = mesh.entries()
    order = entries + [m.app_id(a) for a in mesh.apps if m.app_id(a) not in entries]
    leaves = [n for n in mesh.nodes if n.startswith("svc:")]
    lines = [
        f"mesh: {len(mesh.apps)} apps, {len(leaves)} leaf services, "
        f"entry apps: {', '.join(m.node_name(e) for e in entries) or 'none (every app is called)'}",
    ]
    for node in order:
        app = m.node_name(node)
        tag = " (entry)" if node in entries else ""
        lines.append("")
        lines.append(f"app {app}{tag}  [{mesh.apps[app].path}]")
        paths = m.worst_paths(mesh, node, skip)
        if not paths:
            lines.append("  calls no services")
            continue
        worst = max(paths.values(), key=lambda r: (r.amplification, len(r.edges)))
        lines.append(
            f"  worst-case fan-out: {worst.amplification} attempts on {m.node_name(worst.target)} "
            f"per {app} call ({worst.describe()})"
        )
        if worst.steady < worst.amplification:
            lines.append(f"    with retry budgets: about {worst.steady:.3g} in steady state")
        lines.append(
            f"  up to {m.total_requests(mesh, node, skip)} upstream requests in all per {app} call, "
            "if each call uses every dependency"
        )
        t, slow = m.callee_worst(mesh, app)
        if slow is not None:
            extra = m.fallback_time(slow)
            then = f", then {fmt_seconds(extra)} of fallback service" if extra else ""
            lines.append(
                f"  worst-case time for its dependencies: {fmt_seconds(t)} "
                f"(on {slow.name}: {breakdown(slow.service).formula()}{then})"
            )
        reach = ", ".join(
            f"{m.node_name(n)} ×{r.amplification}" for n, r in paths.items()
        )
        lines.append(f"  reaches: {reach}")
    return "\n".join(lines)
