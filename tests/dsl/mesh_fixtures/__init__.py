"""Build compiled units for mesh tests directly from plan dataclasses (no parser needed)."""

from __future__ import annotations

from typing import Iterable

from dsl.diagnostics import Span
from dsl.plan import (
    BackoffSpec,
    BudgetSpec,
    FallbackSpec,
    HedgeSpec,
    Plan,
    RetrySpec,
    ServicePlan,
)
from dsl.units import CompiledUnit


def svc(
    name: str,
    retries: int | None = None,
    *,
    timeout: float = 5.0,
    per_try: float | None = None,
    hedges: int = 0,
    backoff: tuple[float, float] | None = None,
    budget: float | None = None,
    fallback: Iterable[str] = (),
    **extra: object,
) -> ServicePlan:
    """A service plan: `retries` None means no retry statement."""
    retry = None
    if retries is not None:
        retry = RetrySpec(
            retries=retries,
            per_try_timeout=per_try,
            backoff=BackoffSpec("exponential", backoff[0], backoff[1]) if backoff else None,
            budget=BudgetSpec(budget) if budget is not None else None,
        )
    return ServicePlan(
        name=name,
        endpoints=(),
        timeout=timeout,
        retry=retry,
        hedge=HedgeSpec(delay=0.05, max_extra=hedges) if hedges else None,
        fallbacks=tuple(FallbackSpec(kind="service", service=f) for f in fallback),
        **extra,  # type: ignore[arg-type]
    )


def unit(app: str, *services: ServicePlan, path: str | None = None) -> CompiledUnit:
    """One file: `app` on line 1, service i on line i + 3."""
    path = path or f"mesh/{app}.riprap"
    plan = Plan(app=app, services={s.name: s for s in services}, source=path)
    spans = {s.name: Span(path, i + 3, 1) for i, s in enumerate(services)}
    lines = [f"app {app}", ""] + [f"service {s.name} {{ }}" for s in services]
    return CompiledUnit(
        path=path,
        source="\n".join(lines) + "\n",
        plan=plan,
        app_span=Span(path, 1, 1),
        service_spans=spans,
    )


def chain(*hops: tuple[str, int]) -> list[CompiledUnit]:
    """`chain(("edge", 0), ("api", 3), ("ledger", 2))`: edge calls api with 3 retries, api calls ledger with 2."""
    units = []
    for (caller, _), (callee, retries) in zip(hops, hops[1:], strict=False):
        units.append(unit(caller, svc(callee, retries)))
    return units
