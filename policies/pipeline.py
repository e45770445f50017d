"""The call flow: one stage per entry of the plan's `order`, built into a chain.

Each stage (`policies.stages.*`) is built from the shard's `StageParts`
(`policies.stage`) and the handler it wraps, outermost first, ending in the `balance`
stage that picks an endpoint and sends the attempt through the inner transport. A
policy that is not configured is left out of the chain entirely (no cost). Failures
travel as exceptions of `policies.errors` (an attempt's own failure carries `.failure`
= connect-failure | reset | timeout); the service edge (`ServiceRuntime.call`, in
`policies.runtime`) turns them into riprap's answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from dsl.plan import DEFAULT_ORDER
from policies.context import Handler
from policies.stage import StageBuilder, StageParts
from policies.stages import (
    balance,
    breaker,
    chaos,
    concurrency,
    fallback,
    hedge,
    limit,
    retry,
    timeout,
)

# Every stage a plan's `order` may name (the names are `dsl.plan.DEFAULT_ORDER`'s).
BUILDERS: Mapping[str, StageBuilder] = {
    "fallback": fallback.build,
    "limit": limit.build,
    "concurrency": concurrency.build,
    "timeout": timeout.build,
    "retry": retry.build,
    "hedge": hedge.build,
    "breaker": breaker.build,
    "chaos": chaos.build,
    "balance": balance.build,
}


@dataclass(frozen=True, slots=True)
class Chain:
    """A built chain: `handler` runs a call; `names` are its stages, outermost first
    (only those whose policy is on; `balance` always last)."""

    names: tuple[str, ...]
    handler: Handler


def check_order(order: tuple[str, ...], where: str) -> None:
    """ValueError (naming `where`) for an order with an unknown or repeated stage, or
    with `balance` anywhere but last."""
    names = list(order)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise ValueError(
            f"{where}: unknown polic{'ies' if len(unknown) > 1 else 'y'} "
            f"{', '.join(map(repr, unknown))} in order (expected {', '.join(DEFAULT_ORDER)})")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: a policy appears twice in order {names}")
    if "balance" in names and names[-1] != "balance":
        raise ValueError(f"{where}: 'balance' must come last in order {names}")


def build_chain(parts: StageParts) -> Chain:
    """The shard's chain for `parts.order` (outermost first); ValueError for a bad order."""
    check_order(parts.order, f"service '{parts.service}'")
    handler: Handler = balance.build(parts, None)
    names = ["balance"]
    for name in reversed(parts.order):
        if name == "balance":
            continue
        wrapped = BUILDERS[name](parts, handler)
        if wrapped is not None:
            handler = wrapped
            names.append(name)
    return Chain(tuple(reversed(names)), handler)


__all__ = ["BUILDERS", "Chain", "build_chain", "check_order"]
