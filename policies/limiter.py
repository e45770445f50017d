"""Token buckets: a rate limit on calls, and per-key buckets kept in a bounded LRU.

A bucket starts full (the contract), refills continuously at `rate` tokens per second
up to `burst`, and a call takes one token. `try_take` returns 0.0 when it took one, or
the seconds until one will be there — what a 429's `Retry-After` should say.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

from dsl.plan import LimitSpec
from policies.clock import Clock

_ALMOST_ONE = 1.0 - 1e-9  # float refill of n * (1/rate) seconds can land just below 1


def retry_after_seconds(wait: float) -> int:
    """A `Retry-After` value for a wait: whole seconds, rounded up, at least 1.

    Rounding down would invite the client back before a token exists; 0 would invite
    it back at once.
    """
    return max(1, math.ceil(wait - 1e-9))


class TokenBucket:
    __slots__ = ("rate", "burst", "_clock", "_tokens", "_last")

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        if not rate > 0:
            raise ValueError(f"a token bucket needs a positive rate, got {rate}")
        if not burst > 0:
            raise ValueError(f"a token bucket needs a positive burst, got {burst}")
        self.rate = float(rate)
        # A bucket that can never hold a whole token would refuse every call forever
        # (e.g. `limit 0.5/s` with the default one-second burst): hold at least one.
        self.burst = max(float(burst), 1.0)
        self._clock = clock
        self._tokens = self.burst
        self._last = clock.now()

    def _refill(self) -> float:
        now = self._clock.now()
        elapsed = now - self._last
        if elapsed > 0.0:
            tokens = self._tokens + elapsed * self.rate
            self._tokens = tokens if tokens < self.burst else self.burst
            self._last = now
        return self._tokens

    def try_take(self) -> float:
        """Take a token: 0.0 if taken, else seconds until one is available (nothing taken)."""
        tokens = self._refill()
        if tokens >= _ALMOST_ONE:  # waiting exactly the reported time must succeed
            self._tokens = tokens - 1.0 if tokens > 1.0 else 0.0
            return 0.0
        return (1.0 - tokens) / self.rate

    @property
    def tokens(self) -> float:
        return self._refill()


# A per-header key longer than this is kept as its 16-byte BLAKE2b digest, so the LRU is
# bounded in bytes (max_keys x about 100 bytes), not only in keys: 400 distinct 1 MiB
# values must not hold 400 MiB.
MAX_KEY_CHARS = 64
DIGEST_BYTES = 16


def bucket_key(value: str | None) -> str | bytes | None:
    """The LRU key of a header value: the value itself when short, else a fixed-size digest
    (bytes, so it can never equal a short value's own key)."""
    if value is None or len(value) <= MAX_KEY_CHARS:
        return value
    return hashlib.blake2b(value.encode("utf-8", "surrogateescape"),
                           digest_size=DIGEST_BYTES).digest()


class KeyedLimiter:
    """One bucket for the service, or one per value of `spec.per_header`.

    Per-key buckets live in an LRU of at most `spec.max_keys`, each key at most
    `MAX_KEY_CHARS` long (a longer value is kept as a digest: `bucket_key`): memory is
    bounded in keys and in bytes, whatever the callers send. A key evicted and seen again
    starts with a full bucket (the price of the bound). Requests without the header share
    one bucket (key None).
    """

    __slots__ = ("spec", "_clock", "_single", "_buckets", "_max_keys", "limited")

    def __init__(self, spec: LimitSpec, clock: Clock) -> None:
        if spec.max_keys < 1:
            raise ValueError(f"a keyed limiter needs max_keys >= 1, got {spec.max_keys}")
        self.spec = spec
        self._clock = clock
        self._single = TokenBucket(spec.rate, spec.burst, clock) if spec.per_header is None else None
        self._buckets: OrderedDict[str | bytes | None, TokenBucket] = OrderedDict()
        self._max_keys = spec.max_keys
        self.limited = 0  # calls refused since creation

    @property
    def per_header(self) -> str | None:
        return self.spec.per_header

    def bucket(self, key: str | None) -> TokenBucket:
        """The bucket for `key` (created full, evicting the least recently used)."""
        if self._single is not None:
            return self._single
        lru = bucket_key(key)
        buckets = self._buckets
        b = buckets.get(lru)
        if b is None:
            if len(buckets) >= self._max_keys:
                buckets.popitem(last=False)
            b = buckets[lru] = TokenBucket(self.spec.rate, self.spec.burst, self._clock)
        else:
            buckets.move_to_end(lru)
        return b

    def try_take(self, key: str | None = None) -> float:
        wait = self.bucket(key).try_take()
        if wait:
            self.limited += 1
        return wait

    def __len__(self) -> int:
        return 1 if self._single is not None else len(self._buckets)

    def snapshot(self) -> dict[str, object]:
        snap: dict[str, object] = {
            "rate": self.spec.rate,
            "burst": self.spec.burst,
            "limited": self.limited,
        }
        if self._single is not None:
            snap["tokens"] = round(self._single.tokens, 3)
        else:
            snap["per_header"] = self.spec.per_header
            snap["keys"] = len(self._buckets)
            snap["max_keys"] = self._max_keys
        return snap
