"""`Env`: what every runtime of a transport shares, handed down from plan to shard."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import httpx

from policies.clock import Clock
from policies.safe_observer import SafeObserver
from policies.tracing import Tracer

if TYPE_CHECKING:  # loads redis: only plans with shared limits import it
    from policies.store import StoreHub


class Env:
    """What every runtime shares: clock, randomness, observer, inner transport, chaos switch,
    and the tracer (None unless tracing was asked for: then no tracing code runs on a call)."""

    __slots__ = ("clock", "rng", "observer", "inner", "chaos", "tracer", "stores")

    def __init__(self, clock: Clock, rng: random.Random, observer: SafeObserver,
                 inner: httpx.AsyncBaseTransport, chaos: bool,
                 tracer: Tracer | None = None) -> None:
        self.tracer = tracer
        self.clock = clock
        self.rng = rng
        self.observer = observer
        self.inner = inner
        self.chaos = chaos
        # The shared store connections (a `policies.store.StoreHub`), made by the first
        # plan with `limit ... shared`; None until then (plans without pay nothing).
        self.stores: StoreHub | None = None


__all__ = ["Env"]
