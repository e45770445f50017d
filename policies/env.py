"""`Env`: what every runtime of a transport shares, handed down from plan to shard."""

from __future__ import annotations

import random

import httpx

from policies.clock import Clock
from policies.safe_observer import SafeObserver
from policies.tracing import Tracer


class Env:
    """What every runtime shares: clock, randomness, observer, inner transport, chaos switch,
    and the tracer (None unless tracing was asked for: then no tracing code runs on a call)."""

    __slots__ = ("clock", "rng", "observer", "inner", "chaos", "tracer")

    def __init__(self, clock: Clock, rng: random.Random, observer: SafeObserver,
                 inner: httpx.AsyncBaseTransport, chaos: bool,
                 tracer: Tracer | None = None) -> None:
        self.tracer = tracer
        self.clock = clock
        self.rng = rng
        self.observer = observer
        self.inner = inner
        self.chaos = chaos


__all__ = ["Env"]
