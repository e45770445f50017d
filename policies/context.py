"""`CallContext`: what one call carries through its chain, shared by its retries and hedges,
and the request body it gets ready once (replayable from memory, or streamed once)."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine, Protocol, Sequence

import httpx

from policies.headers import forward_items, header_value, parse_deadline_header
from policies.streams import PrefixedStream, iter_chunks

# What `forward_items` finds in the caller's headers: forwarded items, deadline, wanted values.
Scanned = tuple[list[tuple[bytes, bytes, bytes]], bytes | None, dict[bytes, list[bytes]]]

IDEMPOTENCY_KEY = b"idempotency-key"

# A stage of the chain: takes the call, answers it (or raises a `policies.errors` failure).
Handler = Callable[["CallContext"], Coroutine[Any, Any, httpx.Response]]

# `CallContext.stream` once a too-big-to-replay body went upstream: it cannot go again.
SPENT: Any = object()


class Services(Protocol):
    """The plan's services, as a `fallback service NAME` link calls one (`PlanRuntime`)."""

    def has_service(self, name: str) -> bool: ...

    async def call_service(self, name: str, request: httpx.Request,
                           incoming_deadline: float | None,
                           depth: int) -> tuple[httpx.Response, int] | None:
        """(answer, attempts) of the call sent through service `name`'s whole chain;
        None when there is no such service."""
        ...


class CallContext:
    """Everything one call carries through the chain (shared by its retries and hedges)."""

    __slots__ = (
        "services", "needs_replay", "request", "method", "raw_path", "headers", "body",
        "stream", "replayable", "body_bound", "deadline", "incoming_deadline", "attempts",
        "tried", "losers", "fallback_depth", "fallback_used", "fallback_reason", "expired",
        "caller_bound", "wanted", "found", "failed",
    )

    def __init__(self, services: Services, request: httpx.Request, *,
                 wanted: frozenset[bytes], body_bound: int, needs_replay: bool,
                 incoming_deadline: float | None, start: float, depth: int = 0,
                 scanned: "Scanned | None" = None) -> None:
        self.services = services
        self.needs_replay = needs_replay  # else a streamed body goes straight through
        self.request = request
        self.method = request.method
        url = request.url
        self.raw_path = url.raw_path
        # the caller's headers, scanned once (by the service edge, when it has): what is
        # forwarded, an incoming deadline, and the values of the headers `wanted`
        if scanned is None:
            scanned = forward_items(request.headers, wanted)
        self.headers, header_deadline, self.found = scanned
        self.wanted = wanted
        if header_deadline is not None:  # the caller's own x-riprap-deadline-ms
            parsed = parse_deadline_header(header_deadline.decode("latin-1"), start)
            if parsed is not None and (incoming_deadline is None or parsed < incoming_deadline):
                incoming_deadline = parsed
        self.body: bytes | None = None
        self.stream: httpx.AsyncByteStream | None = None
        self.replayable = True
        self.body_bound = body_bound
        self.deadline = incoming_deadline
        self.incoming_deadline = incoming_deadline
        # the deadline is the caller's own, shorter than the service's timeout: running out
        # of it says nothing of the upstream (no breaker, ejection or latency sample)
        self.caller_bound = False
        self.attempts = 0
        self.tried: set[str] = set()
        # endpoints that failed this call: "broken" for its retries, so a retry moves on to
        # the next tier when every endpoint of this one failed (Envoy's previous_priorities)
        self.failed: set[str] | None = None
        self.losers: set[asyncio.Task[Any]] | None = None
        self.fallback_depth = depth
        self.fallback_used: str | None = None
        self.fallback_reason: str | None = None
        self.expired = False  # the call's deadline fired

    async def prepare_body(self) -> None:
        """Get the request body ready for the first attempt.

        A body already in memory is used as it is. A streamed body is passed straight
        through, unread, when nothing could ever send it twice (no retry, hedge or
        service fallback); otherwise it is read once, up to the replay bound, and a
        bigger one is streamed to a single attempt.
        """
        if self.body is not None or self.stream is not None:
            return
        request = self.request
        try:
            self.body = request.content
            return
        except httpx.RequestNotRead:
            pass
        if not self.needs_replay:
            self.stream = PrefixedStream([], iter_chunks(request.stream).__aiter__())
            self.replayable = False
            return
        bound = self.body_bound
        chunks: list[bytes] = []
        size = 0
        it = iter_chunks(request.stream).__aiter__()
        while True:
            try:
                chunk = await it.__anext__()
            except StopAsyncIteration:
                break
            if not chunk:
                continue
            chunks.append(chunk)
            size += len(chunk)
            if size > bound:
                self.stream = PrefixedStream(chunks, it)
                self.replayable = False
                return
        self.body = b"".join(chunks)

    def header(self, lname: bytes | None, name: str) -> str | None:
        """`self.request.headers.get(name)` (`lname`: the name lower-cased, as bytes),
        from the one pass over the headers when the service wanted it."""
        if lname in self.wanted:
            return header_value(self.found.get(lname), self.request.headers, name)
        found: str | None = self.request.headers.get(name)
        return found


def idempotent(ctx: CallContext, methods: Sequence[str]) -> bool:
    """Safe to send twice: a method in `methods`, or the caller sent an Idempotency-Key."""
    if ctx.method in methods:
        return True
    if IDEMPOTENCY_KEY in ctx.wanted:
        return IDEMPOTENCY_KEY in ctx.found
    return "idempotency-key" in ctx.request.headers


__all__ = ["SPENT", "CallContext", "Handler", "Services", "idempotent"]
