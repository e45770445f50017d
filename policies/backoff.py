"""Backoff delays between retries: exponential or constant, with jitter.

Pure: the random source is a parameter, so a seeded `random.Random` gives an exact,
repeatable sequence in tests (no module-level `random`, unlike tenacity).
"""

from __future__ import annotations

import random

from dsl.plan import BackoffSpec

_JITTERS = ("full", "equal", "decorrelated", "none")


class Backoff:
    """Delay before retry number n (1 = the first retry).

    exponential: d = min(max, base * 2**(n-1)); constant: d = base. Then jitter:
    full U(0, d); equal d/2 + U(0, d/2); none d; decorrelated (AWS)
    min(max, U(base, previous*3)) where `previous` is the last delay returned
    (base when None), so the caller threads it through.
    """

    __slots__ = ("spec", "_base", "_max", "_exponential", "_jitter")

    def __init__(self, spec: BackoffSpec) -> None:
        if spec.base < 0 or spec.max < 0:
            raise ValueError(f"backoff delays must not be negative: {spec.base}..{spec.max}")
        if spec.jitter not in _JITTERS:
            raise ValueError(f"unknown jitter {spec.jitter!r}; expected one of {', '.join(_JITTERS)}")
        if spec.kind not in ("exponential", "constant"):
            raise ValueError(f"unknown backoff kind {spec.kind!r}")
        self.spec = spec
        self._base = float(spec.base)
        # A constant backoff never grows; an inverted range is treated as capped at base.
        self._max = float(spec.base if spec.kind == "constant" else max(spec.max, spec.base))
        self._exponential = spec.kind == "exponential"
        self._jitter = spec.jitter

    def ceiling(self, retry_number: int) -> float:
        """The delay before jitter: the most `delay` can return for this retry (bar decorrelated)."""
        if retry_number < 1:
            raise ValueError(f"retry numbers start at 1, got {retry_number}")
        if not self._exponential:
            return self._base
        if retry_number > 64:  # 2**63 * base is past any cap; avoid float overflow
            return self._max
        return min(self._max, self._base * (1 << (retry_number - 1)))

    def delay(self, retry_number: int, rng: random.Random, previous: float | None = None) -> float:
        jitter = self._jitter
        if jitter == "decorrelated":
            if retry_number < 1:
                raise ValueError(f"retry numbers start at 1, got {retry_number}")
            base = self._base
            hi = (base if previous is None else previous) * 3.0
            if hi < base:
                hi = base
            return min(self._max, base + rng.random() * (hi - base))
        d = self.ceiling(retry_number)
        if jitter == "full":
            return rng.random() * d
        if jitter == "equal":
            half = d / 2.0
            return half + rng.random() * half
        return d
