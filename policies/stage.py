"""The stage interface: what one stage of a shard's call chain is built from.

A stage is `build(parts, inner) -> Handler | None`: given the shard's `StageParts` and
the handler it wraps, it returns its own handler (`async (ctx) -> httpx.Response`), or
None when its policy is off (the stage is then left out of the chain). The runtime
(`policies.runtime`) builds one `StageParts` per shard from the plan, carrying live state
over a reload; the stages (`policies.stages.*`) read only this object and the call's
`CallContext`, and never import the runtime.

A stage reads the parts it needs once, when the chain is built, and keeps them in its
closure (the per-call path does no attribute hunting). Only `pool.view` (the endpoint
list, which a DNS re-lookup replaces) is read per call, so that it can change while
calls are in flight. Where a second implementation is expected, the part is typed by a
small protocol (a shared limiter whose `take` is awaited).
See docs/engine.md, "The stage interface".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable


from dsl.plan import FallbackSpec, ServicePlan, ShardPlan
from policies.balancer import Balancer
from policies.breaker import CircuitBreaker
from policies.budget import RetryBudget
from policies.bulkhead import Bulkhead
from policies.chaos import ChaosInjector
from policies.context import Handler
from policies.endpoint import EndpointPool
from policies.env import Env
from policies.fallback import StaleCache, StaticAnswer
from policies.health import OutlierDetector
from policies.hedge import HedgeDelay
from policies.latency import LatencyWindow
from policies.retry import RetryPolicy


class Limiter(Protocol):
    """A local rate limiter (`policies.limiter.KeyedLimiter`): decides at once."""

    @property
    def per_header(self) -> str | None: ...

    def try_take(self, key: str | None = None) -> float:
        """0.0 to go ahead, else the seconds until a token is due (the call is refused)."""
        ...


@runtime_checkable
class AsyncLimiter(Protocol):
    """A limiter that must ask elsewhere (a shared store): the limit stage awaits `take`."""

    @property
    def per_header(self) -> str | None: ...

    async def take(self, key: str | None = None) -> float:
        """As `Limiter.try_take`, awaited."""
        ...


Fallbacks = tuple[tuple[FallbackSpec, StaticAnswer | None], ...]


@dataclass(slots=True, kw_only=True, eq=False)
class StageParts:
    """Everything the stages of one shard's chain use, and nothing else.

    `service`/`shard`: names (`shard` None for an unsharded service). `spec`: the shard's
    policy spec (the service's own when unsharded). `order`: the chain's stage names,
    outermost first (the plan's `order`). A policy that is off is None (or empty).
    """

    service: str
    shard: str | None
    spec: ServicePlan | ShardPlan
    order: tuple[str, ...]
    env: Env  # clock, rng, observer, inner transport, chaos switch
    pool: EndpointPool  # the endpoints; `pool.view` is read per call (replaceable)
    balancer: Balancer
    latency: LatencyWindow
    limiter: Limiter | AsyncLimiter | None = None
    bulkhead: Bulkhead | None = None
    breaker: CircuitBreaker | None = None
    retry: RetryPolicy | None = None
    budget: RetryBudget | None = None
    hedge: HedgeDelay | None = None
    chaos: ChaosInjector | None = None
    outlier: OutlierDetector | None = None
    fallbacks: Fallbacks = ()
    stale_cache: StaleCache | None = None  # the service's (shared by its shards)

    @property
    def where(self) -> str:
        """`service 'x'` or `service 'x' shard 'y'`, for messages."""
        return f"service '{self.service}'" + (f" shard '{self.shard}'" if self.shard else "")

    @property
    def needs_replay(self) -> bool:
        """Could a call ever send its body twice? If not, bodies stream straight through."""
        return bool(self.retry or self.hedge or any(f.kind == "service" for f, _ in self.fallbacks))


StageBuilder = Callable[[StageParts, Handler], "Handler | None"]


__all__ = ["AsyncLimiter", "Fallbacks", "Limiter", "StageBuilder", "StageParts"]
