"""What the engine tells a tracer: one span per call, one child span per attempt.

The engine depends only on this protocol; `sidecar/tracing.py` implements it with the
OpenTelemetry SDK, and only when the standard `OTEL_EXPORTER_OTLP_*` variables ask for it.
Without a tracer (`Env.tracer is None`) nothing here runs on the call path.

The call span is put in `CURRENT_CALL` (a context variable) by the service edge, so the
attempt stage, retries and hedge tasks (which copy the context) find it without the
call context carrying it through every stage.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol, Sequence

# (name, lower-cased name, value): the shape of the forwarded header triples
HeaderTriple = tuple[bytes, bytes, bytes]
TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})


class AttemptSpan(Protocol):
    """One attempt upstream: its W3C headers to send, then its outcome."""

    headers: Sequence[HeaderTriple]  # traceparent (and tracestate) naming this attempt

    def end(self, outcome: str, status: int | None = None) -> None: ...


class CallSpan(Protocol):
    """One proxied call, `riprap SERVICE`, the parent of its attempts."""

    def attempt(self, endpoint: str, number: int) -> AttemptSpan: ...

    def event(self, name: str, **attributes: str | int | float | bool) -> None: ...

    def end(self, outcome: str, status: int, attempts: int, fallback: str | None,
            breaker: str | None) -> None: ...


class Tracer(Protocol):
    def start_call(self, service: str, headers: Sequence[tuple[bytes, bytes]],
                   deadline_ms: float | None) -> CallSpan: ...

    def shutdown(self) -> None: ...


CURRENT_CALL: ContextVar[CallSpan | None] = ContextVar("riprap_call_span", default=None)


def with_trace_headers(headers: list[HeaderTriple], span: AttemptSpan) -> list[HeaderTriple]:
    """The forwarded headers with the caller's traceparent/tracestate replaced by the attempt's."""
    kept = [h for h in headers if h[1] not in TRACE_HEADERS]
    kept.extend(span.headers)
    return kept


__all__ = ["CURRENT_CALL", "AttemptSpan", "CallSpan", "Tracer", "with_trace_headers"]
