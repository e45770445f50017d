"""`CallContext`: what one call carries through its chain, shared by its retries and hedges,
and the request body it gets ready once (replayable from memory, or streamed once)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import httpx

from policies.headers import forward_items, parse_deadline_header
from policies.streams import PrefixedStream, iter_chunks

if TYPE_CHECKING:
    from policies.runtime import PlanRuntime, ServiceRuntime, ShardRuntime

# A stage of the chain: takes the call, answers it (or raises a `policies.errors` failure).
Handler = Callable[["CallContext"], Awaitable[httpx.Response]]

# `CallContext.stream` once a too-big-to-replay body went upstream: it cannot go again.
SPENT: Any = object()


class CallContext:
    """Everything one call carries through the chain (shared by its retries and hedges)."""

    __slots__ = (
        "runtime", "shard", "request", "method", "raw_path", "headers", "body", "stream",
        "replayable", "body_bound", "deadline", "incoming_deadline", "attempts", "tried",
        "losers", "fallback_depth", "fallback_used", "fallback_reason", "expired",
    )

    def __init__(self, runtime: "PlanRuntime", service: "ServiceRuntime",
                 shard: "ShardRuntime", request: httpx.Request,
                 incoming_deadline: float | None, start: float, depth: int = 0) -> None:
        self.runtime = runtime
        self.shard = shard
        self.request = request
        self.method = request.method
        url = request.url
        self.raw_path = url.raw_path
        self.headers, header_deadline = forward_items(request.headers)
        if header_deadline is not None:  # the caller's own x-riprap-deadline-ms
            parsed = parse_deadline_header(header_deadline.decode("latin-1"), start)
            if parsed is not None and (incoming_deadline is None or parsed < incoming_deadline):
                incoming_deadline = parsed
        self.body: bytes | None = None
        self.stream: httpx.AsyncByteStream | None = None
        self.replayable = True
        self.body_bound = service.spec.max_body_buffer
        self.deadline = incoming_deadline
        self.incoming_deadline = incoming_deadline
        self.attempts = 0
        self.tried: set[str] = set()
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
        if not self.shard.needs_replay:
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


def idempotent(ctx: CallContext, methods: Sequence[str]) -> bool:
    """Safe to send twice: a method in `methods`, or the caller sent an Idempotency-Key."""
    if ctx.method in methods:
        return True
    return "idempotency-key" in ctx.request.headers


__all__ = ["SPENT", "CallContext", "Handler", "idempotent"]
