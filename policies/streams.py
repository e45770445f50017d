"""The bodies a call passes along, never buffered: the response wrapper that releases what
the call held when it is closed (and tees a good GET answer into the stale cache), and
the request body too big to replay (the chunks read so far, then the rest)."""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Callable

import httpx

from policies.clock import Clock
from policies.fallback import StaleCache

log = logging.getLogger("riprap.policies")


class StaleTee:
    """Copies a good GET answer's body as it streams, and stores it once complete."""

    __slots__ = ("cache", "key", "status", "headers", "limit", "clock", "chunks", "size")

    def __init__(self, cache: StaleCache, key: str, status: int,
                 headers: list[tuple[str, str]], clock: Clock) -> None:
        self.cache = cache
        self.key = key
        self.status = status
        self.headers = headers
        self.limit = cache.max_entry_bytes
        self.clock = clock
        self.chunks: list[bytes] | None = []
        self.size = 0

    def feed(self, chunk: bytes) -> None:
        if self.chunks is None:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.chunks = None  # over the entry bound: not kept
        else:
            self.chunks.append(chunk)

    def complete(self) -> None:
        if self.chunks is not None:
            self.cache.put(self.key, self.status, self.headers, b"".join(self.chunks),
                           self.clock.now())
            self.chunks = None


class CallStream(httpx.AsyncByteStream):
    """The upstream's body, passed through unbuffered; releases what the call held on close.

    `on_close` callbacks (endpoint in-flight count, concurrency slot) run exactly once,
    whether the body was read to the end, abandoned, or the call was cancelled.
    """

    __slots__ = ("_inner", "_on_close", "tee", "_closed")

    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self._inner = inner
        self._on_close: list[Callable[[], None]] = []
        self.tee: StaleTee | None = None
        self._closed = False

    def on_close(self, callback: Callable[[], None]) -> None:
        if self._closed:
            callback()
        else:
            self._on_close.append(callback)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        tee = self.tee
        inner = self._inner
        if isinstance(inner, httpx.AsyncByteStream):
            async for chunk in inner:
                if tee is not None:
                    tee.feed(chunk)
                yield chunk
        else:  # a sync stream from a sync-minded inner transport
            for chunk in inner:
                if tee is not None:
                    tee.feed(chunk)
                yield chunk
        if tee is not None:
            tee.complete()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._inner, "aclose", None)
            if close is not None:
                await close()
        finally:
            callbacks, self._on_close = self._on_close, []
            for cb in callbacks:
                try:
                    cb()
                except Exception as exc:  # noqa: BLE001 - a release must not stop the others
                    log.warning("release callback failed: %r", exc)


def on_close(resp: httpx.Response, callback: Callable[[], None]) -> None:
    """Run `callback` when the response's body is closed — at once if it already is
    (a body read in full at creation holds nothing upstream, and httpx never closes it)."""
    if resp.is_closed:
        callback()
    else:
        call_stream(resp).on_close(callback)


def call_stream(resp: httpx.Response) -> CallStream:
    """The response's CallStream, wrapping its stream the first time."""
    stream = resp.stream
    if isinstance(stream, CallStream):
        return stream
    wrapped = CallStream(stream)  # type: ignore[arg-type]
    resp.stream = wrapped
    return wrapped


class PrefixedStream(httpx.AsyncByteStream):
    """A request body larger than the replay bound: the chunks read so far, then the rest."""

    def __init__(self, head: list[bytes], rest: AsyncIterator[bytes]) -> None:
        self._head = head
        self._rest = rest
        self._used = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._used:
            raise httpx.StreamConsumed()
        self._used = True
        for chunk in self._head:
            yield chunk
        async for chunk in self._rest:
            yield chunk


async def iter_chunks(stream: Any) -> AsyncIterator[bytes]:
    """A request stream's chunks, whether the stream is async or sync."""
    if isinstance(stream, httpx.AsyncByteStream):
        async for chunk in stream:
            yield chunk
    else:
        for chunk in stream:
            yield chunk


__all__ = ["CallStream", "PrefixedStream", "StaleTee", "call_stream", "iter_chunks", "on_close"]
