"""What each engine does with a plan: which statements it runs natively, which through an
extension point, which only approximately (contract section 11).

The realisations are the statement table's (dsl/statements.py); this module reads a
resolved plan back into the statements it uses, so it works for a compiled `.riprap` and
for a plan `.json` alike. `check --engine envoy` reports each approximate statement as
warning RP501 at the line it comes from; `explain --engine` lists all three kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from dsl.diagnostics import Diagnostic, Span
from dsl.plan import Plan, ServicePlan, ShardPlan
from dsl.statements import ENGINES, Envoy, Use
from dsl.units import CompiledUnit

__all__ = ["ENGINES", "Difference", "differences", "engine_findings", "engine_lines", "uses"]


def uses(scope: ServicePlan | ShardPlan) -> list[Use]:
    """The statements (and engine-relevant options) a resolved service or shard uses."""
    out: list[Use] = [Use("timeout")]
    if scope.retry is not None:
        out.append(Use("retry"))
        if scope.retry.budget is not None:
            out.append(Use("retry", None, "budget"))
    if scope.hedge is not None:
        out.append(Use("hedge", "after" if scope.hedge.delay is not None else "at"))
    if scope.breaker is not None:
        out.append(Use("breaker", "failures" if scope.breaker.kind == "consecutive" else "failure-rate"))
    if scope.limit is not None:
        out.append(Use("limit"))
        if scope.limit.shared:
            out.append(Use("limit", None, "shared"))
    if scope.concurrency is not None:
        out.append(Use("concurrency"))
        if scope.concurrency.queue > 0:
            out.append(Use("concurrency", None, "queue-timeout"))
    for f in scope.fallbacks:
        if f.kind == "static":
            form = "file" if f.file else "json" if f.content_type == "application/json" else "text"
        else:
            form = f.kind
        out.append(Use("fallback", form))
    for c in scope.chaos:
        out.append(Use("chaos", c.kind))
    if scope.tls is not None:
        out.append(Use("tls"))
    if any(e.tier == 0 for e in scope.endpoints):
        out.append(Use("endpoint"))
    if any(e.tier > 0 for e in scope.endpoints):
        out.append(Use("failover"))
    for e in scope.endpoints:
        if e.resolve is not None:
            out.append(Use("failover" if e.tier else "endpoint", None, "resolve"))
    if scope.endpoints:
        out.append(Use("balance"))
    if scope.health is not None:
        out.append(Use("health"))
    if scope.outlier is not None:
        out.append(Use("outlier"))
    if isinstance(scope, ServicePlan) and scope.sharding is not None:
        out.append(Use("shard-by", scope.sharding.by))
        out.append(Use("shard"))
        if scope.sharding.default is not None:
            out.append(Use("shard-default"))
    return list(dict.fromkeys(out))


def _service_uses(svc: ServicePlan) -> list[Use]:
    """A service's uses and its shards' (each once, the service's first)."""
    found = uses(svc)
    for shard in svc.shards:
        found += uses(shard)
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class Difference:
    """A statement a service uses that `engine` runs only approximately."""

    service: str
    use: Use
    differs: str


def differences(plan: Plan, engine: str) -> list[Difference]:
    """Every (service, statement) that `engine` realises approximately, in plan order."""
    out: list[Difference] = []
    for name, svc in plan.services.items():
        for use in _service_uses(svc):
            how = use.realisation(engine)
            if how.how == "approximate":
                out.append(Difference(name, use, how.differs))
    return out


def _locate(unit: CompiledUnit, service: str, use: Use) -> Span:
    spans = unit.statement_spans.get(service, {})
    for key in (f"{use.kind} {use.form}", use.kind):
        if key in spans:
            return spans[key]
    return unit.service_spans.get(service) or Span(unit.path, 1, 1)


def engine_findings(unit: CompiledUnit, engine: str) -> list[Diagnostic]:
    """RP501: each statement the unit's plan uses that `engine` runs approximately, at its line."""
    if unit.plan is None:
        return []
    return [
        Diagnostic(
            "RP501",
            "warning",
            _locate(unit, d.service, d.use),
            f"service '{d.service}': `{d.use.text}` runs approximately on the {engine} engine: {d.differs}",
            f"`riprap explain --engine {engine}` lists how each statement runs; the python engine runs it exactly",
        )
        for d in differences(unit.plan, engine)
    ]


def _group(items: Iterable[tuple[Use, Envoy]], how: str, with_text: bool) -> str:
    """The statements realised `how`, those that differ in the same way named together."""
    by_text: dict[str, list[str]] = {}
    for use, envoy in items:
        if envoy.how == how:
            by_text.setdefault(envoy.differs if with_text else "", []).append(use.text)
    parts = [", ".join(names) + (f" ({text})" if text else "") for text, names in by_text.items()]
    return "; ".join(parts)


def engine_lines(svc: ServicePlan, engine: str) -> list[str]:
    """How `engine` runs each statement of a service, for `explain --engine`."""
    found = [(use, use.realisation(engine)) for use in _service_uses(svc)]
    lines = [f"on the {engine} engine:"]
    for how, label, with_text in (
        ("native", "natively", False),
        ("extension", "through an extension point", True),
        ("approximate", "approximately", True),
    ):
        text = _group(found, how, with_text)
        if text:
            lines.append(f"  {label}: {text}")
    return lines
