"""`limit R [burst B] [per header H] shared`: one token bucket for the whole fleet.

A `SharedLimiter` is the fleet-wide twin of `policies.limiter.KeyedLimiter`: the same
rate and burst semantics (bucket starts full, a refused call learns the wait for the next
token, which becomes `Retry-After`), but the bucket is one GCRA key in the plan's
`store` (`policies.store`), shared by every sidecar whose plan has the same `app` and
service. Its key is `riprap:rl:APP:SERVICE[:SHARD]`, and with `per header` one key per
header value, kept as a fixed-size digest (`:h:` + 32 hex characters of BLAKE2b), so a
long or hostile value never makes a long key.

While the store is down (or slower than its deadline), `take` never waits for it: it
answers from a local `KeyedLimiter` of R / N and B / N (at least one token), N being the
number of sidecars seen sharing the bucket in the last minute (at least 1). It goes back
to the shared bucket by itself as soon as the store answers again.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Any

from dsl.plan import LimitSpec
from policies.clock import Clock
from policies.limiter import KeyedLimiter

if TYPE_CHECKING:  # policies.store loads redis: only plans with shared limits pay for it
    from policies.env import Env
    from policies.store import Store, StoreHub

KEY_PREFIX = "riprap:rl:"
PRESENCE_PREFIX = "riprap:sidecars:"


def header_digest(value: str) -> str:
    """A fixed-size stand-in for a header value in a key (32 hex characters)."""
    return hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def bucket_name(app: str, service: str, shard: str | None = None) -> str:
    """`APP:SERVICE[:SHARD]`: what names one shared bucket (and its presence set)."""
    return f"{app}:{service}" + (f":{shard}" if shard else "")


class SharedLimiter:
    """A fleet-wide token bucket in a store, with a local fallback share.

    Built from the spec alone (`policies.runtime` builds it with the other primitives and
    carries it over a reload like a local bucket), then bound to the plan's store and
    app with `bind` before any call: a reload that changes the store or the app rebinds
    the same object, so its local share carries over too.
    """

    __slots__ = ("spec", "store", "name", "presence_key", "_base", "interval_us", "tau_us",
                 "_clock", "_local", "_local_n", "limited", "limited_local", "local_calls",
                 "service", "shard")

    shared = True

    def __init__(self, spec: LimitSpec, service: str, shard: str | None, clock: Clock,
                 store: "Store | None" = None, app: str | None = None) -> None:
        if not spec.rate > 0:
            raise ValueError(f"a token bucket needs a positive rate, got {spec.rate}")
        if not spec.burst > 0:
            raise ValueError(f"a token bucket needs a positive burst, got {spec.burst}")
        self.spec = spec
        self.service = service
        self.shard = shard
        self.store: Store | None = None
        self.name = self._base = self.presence_key = ""
        self.interval_us = 1e6 / spec.rate
        self.tau_us = max(float(spec.burst), 1.0) * self.interval_us
        self._clock = clock
        self._local: KeyedLimiter | None = None
        self._local_n = 0
        self.limited = 0  # calls refused since creation (shared or local)
        self.limited_local = 0  # of which by the local fallback share
        self.local_calls = 0  # calls answered by the local share (store down or late)
        if store is not None and app is not None:
            self.bind(store, app)

    def bind(self, store: "Store", app: str) -> None:
        """Use `store`'s bucket of `app`'s service (and shard) from now on."""
        self.name = bucket_name(app, self.service, self.shard)
        self._base = KEY_PREFIX + self.name
        self.presence_key = self.presence_key_for(app, self.service, self.shard)
        self.store = store

    @staticmethod
    def presence_key_for(app: str, service: str, shard: str | None = None) -> str:
        """The presence set of the bucket of `app`'s `service` (and `shard`)."""
        return PRESENCE_PREFIX + bucket_name(app, service, shard)

    @property
    def per_header(self) -> str | None:
        return self.spec.per_header

    def key(self, value: str | None) -> str:
        """The store key of the bucket for header value `value` (None: no header)."""
        if self.spec.per_header is None:
            return self._base
        if value is None:
            return self._base + ":-"
        return f"{self._base}:h:{header_digest(value)}"

    async def take(self, key: str | None = None, cost: int = 1) -> float:
        """Take `cost` tokens (one per call) from the bucket of header value `key`: 0.0 if
        taken, else the seconds until they are there (`policies.stage.AsyncLimiter`)."""
        value = key
        store = self.store
        if store is not None and store.up:
            wait = await store.take(self.key(value), self.interval_us, self.tau_us, cost)
            if wait is not None:
                if wait:
                    self.limited += 1
                return wait
        wait = 0.0
        for _ in range(min(cost, 1000)):  # the local bucket takes one token at a time
            wait = self.take_local(value)
            if wait:
                break
        return wait

    def take_local(self, value: str | None = None) -> float:
        """The fallback: a local bucket of this sidecar's share of the rate and burst."""
        n = self.share
        local = self._local
        if local is None or n != self._local_n:
            spec = self.spec
            local = self._local = KeyedLimiter(dataclasses.replace(
                spec, rate=spec.rate / n, burst=max(spec.burst / n, 1.0), shared=False),
                self._clock)
            self._local_n = n
        self.local_calls += 1
        wait = local.try_take(value)
        if wait:
            self.limited += 1
            self.limited_local += 1
        return wait

    @property
    def share(self) -> int:
        """The sidecars seen sharing the bucket (at least 1): the local share's divisor."""
        store = self.store
        return store.share(self.presence_key) if store is not None else 1

    @property
    def up(self) -> bool:
        return self.store is not None and self.store.up

    def snapshot(self) -> dict[str, Any]:
        n = self.share
        up = self.up
        snap: dict[str, Any] = {
            "rate": self.spec.rate,
            "burst": self.spec.burst,
            "limited": self.limited,
            "shared": True,
            "bucket": self.name,
            "store": "up" if up else "down",
            "mode": "shared" if up else "local-share",
            "sidecars": n,
            "local_rate": round(self.spec.rate / n, 6),
            "limited_local": self.limited_local,
            "local_calls": self.local_calls,
        }
        if self.spec.per_header is not None:
            snap["per_header"] = self.spec.per_header
        return snap




def make_limiter(spec: LimitSpec, service: str, shard: str | None,
                 clock: Clock) -> "KeyedLimiter | SharedLimiter":
    """The live limiter for `spec`: fleet-wide when `spec.shared`, else a local bucket."""
    if spec.shared:
        return SharedLimiter(spec, service, shard, clock)
    return KeyedLimiter(spec, clock)


class StoreBinding:
    """What one plan runtime holds of the store: acquired when built, released when
    replaced. It binds the runtime's shared limiters (new or carried over) to the plan's
    store and app; a plan without shared limits holds nothing and loads nothing."""

    __slots__ = ("store", "hub", "keys")

    def __init__(self, limiters: list[SharedLimiter], store_url: str | None, app: str,
                 env: "Env") -> None:
        self.store: Store | None = None
        self.hub: StoreHub | None = None
        self.keys: tuple[str, ...] = ()
        if not limiters:
            return
        if store_url is None:
            names = sorted({lim.service for lim in limiters})
            raise ValueError(f"service {names[0]!r} has a shared limit, but the plan has no "
                             "`store` (add `store redis://HOST:PORT`)")
        if env.stores is None:
            from policies.store import StoreHub

            env.stores = StoreHub()
        hub = env.stores
        keys = tuple(dict.fromkeys(
            SharedLimiter.presence_key_for(app, lim.service, lim.shard) for lim in limiters))
        store = hub.acquire(store_url, keys)
        for lim in limiters:
            lim.bind(store, app)
        self.store, self.hub, self.keys = store, hub, keys

    def release(self) -> None:
        store, self.store = self.store, None
        if store is not None and self.hub is not None:
            self.hub.release(store, self.keys)


__all__ = ["KEY_PREFIX", "PRESENCE_PREFIX", "SharedLimiter", "StoreBinding", "bucket_name",
           "header_digest", "make_limiter"]
