"""When a failed attempt may be retried, and how long to wait before it.

`RetryPolicy.retryable` is the contract's rule: the failure or status must be one of the
`on` conditions, and the request must be safe to send twice — an idempotent method (or
one named by `methods`) or an `Idempotency-Key` header — except after a connect failure,
where nothing was sent. `next_wait` adds the timing rules: backoff, `Retry-After`
honoured within the deadline, and no retry when the time left is shorter than the
service's observed median latency.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime

import httpx

from dsl.plan import RetrySpec
from policies.backoff import Backoff

FAILURES = ("connect-failure", "reset", "timeout")


def _has_header(headers: Mapping[str, str] | httpx.Headers, lower_name: str) -> bool:
    """Case-insensitive presence test that works for httpx.Headers and plain dicts."""
    if isinstance(headers, httpx.Headers):
        return lower_name in headers
    if lower_name in headers:
        return True
    for name in headers:
        if name.lower() == lower_name:
            return True
    return False


class RetryPolicy:
    """Live retry rules built from a `RetrySpec`."""

    __slots__ = ("spec", "retries", "backoff", "_failures", "_statuses", "_classes", "_methods")

    def __init__(self, spec: RetrySpec) -> None:
        if spec.retries < 0:
            raise ValueError(f"retry count must not be negative, got {spec.retries}")
        self.spec = spec
        self.retries = spec.retries
        self.backoff = Backoff(spec.backoff) if spec.backoff is not None else None
        failures: set[str] = set()
        statuses: set[int] = set()
        classes: set[int] = set()
        for cond in spec.on:
            c = cond.strip().lower()
            if c in FAILURES:
                failures.add(c)
            elif len(c) == 3 and c.endswith("xx") and c[0] in "12345":
                classes.add(int(c[0]))
            elif len(c) == 3 and c.isdigit() and 100 <= int(c) <= 599:
                statuses.add(int(c))
            else:
                raise ValueError(
                    f"unknown retry condition {cond!r}: expected connect-failure, reset, "
                    "timeout, a status such as 503 or a class such as 5xx"
                )
        self._failures = frozenset(failures)
        self._statuses = frozenset(statuses)
        self._classes = frozenset(classes)
        self._methods = frozenset(m.upper() for m in spec.methods)

    def matches(self, failure: str | None, status: int | None) -> bool:
        """Is this outcome one of the `on` conditions (ignoring idempotency)?"""
        if failure is not None and failure in self._failures:
            return True
        if status is not None:
            return status in self._statuses or (status // 100) in self._classes
        return False

    def safe_to_resend(self, method: str, headers: Mapping[str, str] | httpx.Headers) -> bool:
        """An idempotent (or `methods`-listed) method, or an `Idempotency-Key` header."""
        return method.upper() in self._methods or _has_header(headers, "idempotency-key")

    def retryable(
        self,
        method: str,
        headers: Mapping[str, str] | httpx.Headers,
        failure: str | None,
        status: int | None,
    ) -> bool:
        if not self.matches(failure, status):
            return False
        if failure == "connect-failure":
            return True  # nothing reached the upstream: resending cannot duplicate work
        return self.safe_to_resend(method, headers)

    def backoff_delay(
        self, retry_number: int, rng: random.Random, previous: float | None = None
    ) -> float:
        """The backoff before retry `retry_number` (0 without a backoff: retry at once)."""
        if self.backoff is None:
            return 0.0
        return self.backoff.delay(retry_number, rng, previous)

    def next_wait(
        self,
        retry_number: int,
        rng: random.Random,
        *,
        time_left: float,
        median: float | None = None,
        retry_after: float | None = None,
        previous: float | None = None,
    ) -> float | None:
        """Seconds to wait before retry `retry_number`, or None when it must not start.

        None when the retries are used up, when `Retry-After` (or the backoff) would end
        past the deadline, or when the time left after waiting is shorter than the
        observed median latency (the retry could not finish in time).
        """
        if retry_number > self.retries:
            return None
        wait = self.backoff_delay(retry_number, rng, previous)
        if retry_after is not None and retry_after > wait:
            wait = retry_after
        return wait if retry_fits(time_left, wait, median) else None


def retry_fits(time_left: float, wait: float = 0.0, median: float | None = None) -> bool:
    """Deadline rule: after `wait`, is there still time for a typical (median) attempt?"""
    remaining = time_left - wait
    if remaining <= 0.0:
        return False
    return median is None or remaining >= median


def parse_retry_after(value: str, now_wall: float) -> float | None:
    """`Retry-After` as seconds from now: delay-seconds or an HTTP-date (RFC 9110 10.2.3).

    `now_wall` is wall-clock epoch seconds (dates are absolute). A date in the past gives
    0.0. Anything unparseable gives None (the header is then ignored). Decimal seconds
    are accepted too, as some servers send them.
    """
    text = value.strip()
    if not text:
        return None
    if text[0].isdigit():
        try:
            seconds = float(text)
        except ValueError:
            seconds = None
        if seconds is not None:
            return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # RFC 850 / asctime forms carry no zone: they are GMT
        when = when.replace(tzinfo=UTC)
    try:
        return max(0.0, when.timestamp() - now_wall)
    except (OverflowError, OSError, ValueError):
        return None
