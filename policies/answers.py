"""What failures become: an inner transport's exception as a failure class and riprap's
error for it, and the answers riprap makes itself (its errors, fallbacks, chaos aborts)."""

from __future__ import annotations

import httpx

from policies.errors import (
    FALLBACK_HEADER,
    REASON_HEADER,
    DeadlineExceeded,
    ResilienceError,
    UpstreamFailed,
)
from policies.headers import NOT_CACHED, UpstreamHeadTooLarge

# An upstream status as the attempt outcome the observer hears.
STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


def classify(exc: httpx.HTTPError, url: str) -> tuple[str | None, ResilienceError]:
    """An inner transport's exception as a failure class and riprap's error for it.

    A request that cannot even be written (`LocalProtocolError`: a bad header), and an
    answer whose head is over the bounds (`UpstreamHeadTooLarge`), have no failure class:
    resending cannot help, so they are never retried, nor held against the endpoint."""
    if isinstance(exc, httpx.LocalProtocolError):
        return None, UpstreamFailed(f"{url}: the request cannot be sent ({exc})")
    if isinstance(exc, UpstreamHeadTooLarge):  # it answered: not retried, not its failure
        return None, UpstreamFailed(f"{url}: {exc}")
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol)):
        failure = "connect-failure"
    elif isinstance(exc, httpx.TimeoutException):
        failure = "timeout"
    else:
        failure = "reset"
    text = f"{url}: {failure} ({exc.__class__.__name__}: {exc})"
    if failure == "timeout":
        return failure, DeadlineExceeded(text, failure=failure)
    return failure, UpstreamFailed(text, failure=failure)


def response_or_raise(resp: httpx.Response | None,
                      error: ResilienceError | None) -> httpx.Response:
    """An attempt's outcome passed on: its response, or else its error raised."""
    if resp is not None:
        return resp
    assert error is not None
    raise error


def error_response(exc: ResilienceError) -> httpx.Response:
    """riprap's own answer for a failure: status, reason header, JSON body."""
    return httpx.Response(exc.status, headers=exc.headers(),
                          stream=httpx.ByteStream(exc.body_bytes()))


def fallback_response(status: int, headers: list[tuple[str, str]], body: bytes, kind: str,
                      reason: str) -> httpx.Response:
    """A static or stale fallback answer, marked with its kind and the failure it covers."""
    out = [(k, v) for k, v in headers if k.lower() not in NOT_CACHED]
    out.append(("content-length", str(len(body))))
    out.append((FALLBACK_HEADER, kind))
    out.append((REASON_HEADER, reason))
    return httpx.Response(status, headers=out, stream=httpx.ByteStream(body))


def chaos_abort_response(status: int) -> httpx.Response:
    """The answer of a chaos `abort`: made here, before the call leaves."""
    return httpx.Response(
        status,
        headers=[("content-type", "application/json"), ("x-riprap-chaos", "abort"),
                 (REASON_HEADER, "chaos-abort")],
        content=b'{"error":"injected by riprap chaos"}',
    )


__all__ = ["STATUS_CLASS", "chaos_abort_response", "classify", "error_response",
           "fallback_response", "response_or_raise"]
