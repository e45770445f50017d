"""OpenTelemetry tracing of proxied calls (contract section 9, "Tracing"), when asked for.

`tracer_from_env` returns None unless `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set; then the SDK, its batching span processor
(export happens on the processor's own thread, off the call path) and its OTLP/HTTP
exporter are built the standard way, so every other standard variable works as the SDK
documents it: `OTEL_SERVICE_NAME` (default: the plan's `app`), `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER`/`_ARG`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_*`, timeouts.

Spans: `riprap SERVICE` (kind CLIENT) per call, the child of the incoming W3C
`traceparent` when there is one; `riprap SERVICE attempt` (kind CLIENT) per attempt, the
call span's only children, each sending its own `traceparent`/`tracestate` upstream.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

from policies.tracing import HeaderTriple

log = logging.getLogger("riprap.tracing")

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
FAILED_OUTCOMES = frozenset({"connect-failure", "reset", "timeout", "5xx", "invalid-request",
                             "breaker-open", "chaos"})


def tracing_requested(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return any(env.get(var) for var in ENDPOINT_VARS)


class _Attempt:
    __slots__ = ("_span", "headers", "_call", "_ended")

    def __init__(self, span: Any, headers: Sequence[HeaderTriple], call: "_Call") -> None:
        self._span = span
        self.headers = headers
        self._call = call
        self._ended = False

    def end(self, outcome: str, status: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._call._open -= 1
        span = self._span
        span.set_attribute("riprap.outcome", outcome)
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if outcome in FAILED_OUTCOMES or (status is not None and status >= 500):
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()


class _Call:
    __slots__ = ("_tracer", "_span", "_ctx", "_service", "_open", "_propagator")

    def __init__(self, tracer: Any, span: Any, ctx: Any, service: str, propagator: Any) -> None:
        self._tracer = tracer
        self._span = span
        self._ctx = ctx  # the context with the call span current: attempts are its children
        self._service = service
        self._open = 0
        self._propagator = propagator

    def attempt(self, endpoint: str, number: int) -> _Attempt:
        from opentelemetry.trace import SpanKind, set_span_in_context

        kind = "first" if number == 1 else ("hedge" if self._open > 0 else "retry")
        span = self._tracer.start_span(
            f"riprap {self._service} attempt", context=self._ctx, kind=SpanKind.CLIENT,
            attributes={"riprap.service": self._service, "riprap.endpoint": endpoint,
                        "server.address": endpoint, "riprap.attempt": number,
                        "riprap.attempt.kind": kind,
                        "riprap.retry": kind == "retry", "riprap.hedge": kind == "hedge"})
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=set_span_in_context(span))
        headers = [(k.encode("latin-1"), k.encode("latin-1"), v.encode("latin-1"))
                   for k, v in carrier.items()]
        self._open += 1
        return _Attempt(span, headers, self)

    def event(self, name: str, **attributes: str | int | float | bool) -> None:
        self._span.add_event(name, attributes=attributes)

    def end(self, outcome: str, status: int, attempts: int, fallback: str | None,
            breaker: str | None) -> None:
        span = self._span
        span.set_attribute("riprap.outcome", outcome)
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("riprap.attempts", attempts)
        if fallback is not None:
            span.set_attribute("riprap.fallback", fallback)
            span.add_event("fallback", attributes={"riprap.fallback": fallback,
                                                   "riprap.reason": outcome})
        if breaker is not None:
            span.set_attribute("riprap.breaker.state", breaker)
        if outcome in ("rate-limited", "overloaded", "breaker-open"):
            span.add_event("refused", attributes={"riprap.reason": outcome})
        if status >= 500 and fallback is None:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()


class OtelTracer:
    """The `policies.tracing.Tracer` the engine calls, over one SDK TracerProvider."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = provider
        self._tracer = provider.get_tracer("riprap")
        self._propagator = TraceContextTextMapPropagator()

    def start_call(self, service: str, headers: Sequence[tuple[bytes, bytes]],
                   deadline_ms: float | None) -> _Call:
        from opentelemetry.trace import SpanKind, set_span_in_context

        carrier: dict[str, str] = {}
        for name, value in headers:
            lname = name.lower()
            if lname in (b"traceparent", b"tracestate"):
                carrier[lname.decode("latin-1")] = value.decode("latin-1")
        parent = self._propagator.extract(carrier) if carrier else None
        attributes: dict[str, Any] = {"riprap.service": service}
        if deadline_ms is not None:
            attributes["riprap.deadline_ms"] = deadline_ms
        span = self._tracer.start_span(f"riprap {service}", context=parent,
                                       kind=SpanKind.CLIENT, attributes=attributes)
        return _Call(self._tracer, span, set_span_in_context(span), service, self._propagator)

    def shutdown(self) -> None:
        try:
            self._provider.shutdown()  # flushes what the batch processor still holds
        except Exception:  # noqa: BLE001 - never fail a shutdown over telemetry
            log.exception("tracing: shutdown failed")


def tracer_from_env(app: str, environ: Mapping[str, str] | None = None) -> OtelTracer | None:
    """An OTLP/HTTP tracer when the standard variables ask for one, else None.

    A missing `otel` extra is a clear error: the variables say tracing is wanted.
    """
    env = os.environ if environ is None else environ
    if not tracing_requested(env):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise RuntimeError(
            f"OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed ({exc}); "
            "install riprap with the otel extra: pip install 'riprap[otel]'") from exc
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": app}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    where = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    log.info("tracing: OTLP/HTTP spans to %s", where)
    return OtelTracer(provider)


__all__ = ["OtelTracer", "tracer_from_env", "tracing_requested"]
