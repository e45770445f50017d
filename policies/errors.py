"""riprap's own failures: one exception tree, one `x-riprap-reason` per class.

Every answer riprap makes itself (rather than passing on an upstream's) comes from one of
these. The engine raises them internally and turns them into HTTP answers at the service
edge (`policies.answers.error_response`), so the sidecar and in-process callers see the
same statuses and headers.

    ResilienceError              reason            status
     +-- UnknownService          unknown-service   404 (403 for the sidecar's proxy form)
     +-- BadRequest              no-shard-key      400
     +-- RateLimited             rate-limited      429  (+ Retry-After)
     +-- Overloaded              overloaded        503
     +-- BreakerOpen             breaker-open      503
     +-- NoHealthyEndpoint       no-healthy-endpoint 503
     +-- DeadlineExceeded        timeout           504
     +-- UpstreamFailed          upstream-failed   502  (refused, reset, broken)

Like httpx's `_exceptions.py`, the tree is the documentation: a new failure gets a class
here, a reason, a status, and nowhere else needs to know the mapping.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

REASON_HEADER = "x-riprap-reason"
ATTEMPTS_HEADER = "x-riprap-attempts"
FALLBACK_HEADER = "x-riprap-fallback"
DEADLINE_HEADER = "x-riprap-deadline-ms"


class ResilienceError(Exception):
    """Base of every failure riprap answers for itself.

    `reason` is the `x-riprap-reason` header value, `status` the HTTP status riprap answers
    with. `attempts` is how many attempts went upstream before giving up (set by the
    transport); `service` the service the call was for, when known. `failure` is set
    when one attempt failed on the wire — "connect-failure", "reset" or "timeout", the
    retry conditions — and None for riprap's own decisions (never retried).
    """

    reason: str = "upstream-failed"
    status: int = 502

    def __init__(self, message: str = "", *, service: str | None = None,
                 attempts: int = 0, failure: str | None = None) -> None:
        super().__init__(message or self.reason)
        self.message = message or self.reason
        self.service = service
        self.attempts = attempts
        self.failure = failure

    def headers(self) -> list[tuple[str, str]]:
        """Headers of riprap's own answer for this failure."""
        return [
            ("content-type", "application/json"),
            (REASON_HEADER, self.reason),
            (ATTEMPTS_HEADER, str(self.attempts)),
        ]

    def body(self) -> dict[str, Any]:
        """The JSON body of riprap's own answer."""
        data: dict[str, Any] = {"error": self.message, "reason": self.reason}
        if self.service is not None:
            data["service"] = self.service
        return data

    def body_bytes(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":")).encode()


class UnknownService(ResilienceError):
    """The call names no service of the plan; riprap never forwards to an unnamed host."""

    reason = "unknown-service"
    status = 404

    def __init__(self, name: str, services: Iterable[str] = (), *, status: int = 404) -> None:
        super().__init__(f"unknown service '{name}'")
        self.name = name
        self.services = sorted(services)
        self.status = status

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "services": self.services}


class BadRequest(ResilienceError):
    """The request cannot be routed as written (a sharded service's request without a key)."""

    reason = "no-shard-key"
    status = 400

    def __init__(self, message: str = "", *, reason: str = "no-shard-key",
                 service: str | None = None, attempts: int = 0) -> None:
        super().__init__(message, service=service, attempts=attempts)
        self.reason = reason


class RateLimited(ResilienceError):
    """The token bucket is empty; `retry_after` is the wait for the next token, in seconds."""

    reason = "rate-limited"
    status = 429

    def __init__(self, message: str = "", *, retry_after: float = 1.0,
                 service: str | None = None, attempts: int = 0) -> None:
        super().__init__(message, service=service, attempts=attempts)
        self.retry_after = retry_after

    def retry_after_header(self) -> str:
        """Whole seconds, rounded up, never 0 (a client waiting 0 s would just hit the limit again)."""
        return str(max(1, math.ceil(self.retry_after - 1e-9)))

    def headers(self) -> list[tuple[str, str]]:
        return super().headers() + [("retry-after", self.retry_after_header())]


class Overloaded(ResilienceError):
    """No concurrency slot: the queue was full or the wait for a slot timed out."""

    reason = "overloaded"
    status = 503


class BreakerOpen(ResilienceError):
    """The circuit breaker is open (or its half-open probes are taken): fail fast."""

    reason = "breaker-open"
    status = 503

    def __init__(self, message: str = "", *, retry_in: float | None = None,
                 service: str | None = None, attempts: int = 0) -> None:
        super().__init__(message, service=service, attempts=attempts)
        self.retry_in = retry_in


class NoHealthyEndpoint(ResilienceError):
    """Every endpoint of every tier is unhealthy, ejected or broken (and panic was skipped)."""

    reason = "no-healthy-endpoint"
    status = 503


class DeadlineExceeded(ResilienceError):
    """The call's deadline passed, or too little time was left to start another attempt."""

    reason = "timeout"
    status = 504


class UpstreamFailed(ResilienceError):
    """No answer could be had: refused, reset, broken."""

    reason = "upstream-failed"
    status = 502


__all__ = [
    "ATTEMPTS_HEADER",
    "BadRequest",
    "BreakerOpen",
    "DEADLINE_HEADER",
    "DeadlineExceeded",
    "FALLBACK_HEADER",
    "NoHealthyEndpoint",
    "Overloaded",
    "REASON_HEADER",
    "RateLimited",
    "ResilienceError",
    "UnknownService",
    "UpstreamFailed",
]
