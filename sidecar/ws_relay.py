"""The WebSocket tunnel: after the upstream's 101, bytes both ways until one side closes.

A byte relay, not a frame relay: frames (text, binary, fragments, ping/pong, close with
its code and reason, extensions such as permessage-deflate agreed in the handshake) pass
exactly as the two sides wrote them, at any size, in bounded memory. Each direction has
back-pressure: when the receiving side's write buffer is over `HIGH_WATER`, the sending
side is not read until it drains.

How it ends:
* the upstream closes (after its close frame, or going away): what it sent is flushed to
  the client, then the client connection is closed;
* the upstream resets or breaks: the client connection is aborted (a client library
  reports 1006, abnormal closure), so an error is never passed off as a clean close;
* the client closes or goes away: the upstream connection is closed (aborted on an error).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from sidecar.upgrade import UpstreamSocket

log = logging.getLogger("riprap.proxy")

HIGH_WATER = 256 * 1024


class ClientSide(Protocol):
    """What the relay needs of the client connection (`sidecar.uvicorn_compat`)."""

    transport: asyncio.Transport
    flow: Any

    def start_tunnel(self, head: bytes, relay: Any) -> bytes: ...

    def end_tunnel(self) -> None: ...


class Tunnel:
    """One relayed connection; `run` returns how it ended."""

    def __init__(self, client: ClientSide, upstream: UpstreamSocket) -> None:
        self.client = client
        self.upstream = upstream
        self.transport = client.transport
        self.client_gone = asyncio.get_running_loop().create_future()
        self._draining = False
        self.to_upstream = 0
        self.to_client = 0

    # -- client -> upstream (called by the client's protocol) ------------------------

    def from_client(self, data: bytes) -> None:
        up = self.upstream
        try:
            up.write(data)
        except (OSError, RuntimeError):
            self._end_client(None)
            return
        self.to_upstream += len(data)
        if up.buffered() > HIGH_WATER and not self._draining:
            self._draining = True
            self.transport.pause_reading()
            asyncio.get_running_loop().create_task(self._drain_upstream())

    async def _drain_upstream(self) -> None:
        try:
            await self.upstream.drain()
        except (OSError, RuntimeError):
            pass
        finally:
            self._draining = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def client_lost(self, exc: Exception | None) -> None:
        self._end_client(exc)

    def _end_client(self, exc: Exception | None) -> None:
        if not self.client_gone.done():
            self.client_gone.set_result(exc)

    # -- upstream -> client ---------------------------------------------------------

    async def run(self, head: bytes) -> str:
        """Write the 101 head to the client and relay until either side is done."""
        early = self.client.start_tunnel(head, self)
        if early:
            self.from_client(early)
        pump = asyncio.get_running_loop().create_task(self._pump())
        try:
            done, _ = await asyncio.wait({pump, self.client_gone},
                                         return_when=asyncio.FIRST_COMPLETED)
            if pump in done:
                ended = pump.result()
                return ended
            exc = self.client_gone.result()
            if exc is None:
                self.upstream.close()
            else:
                self.upstream.abort()
            pump.cancel()
            return "client-closed" if exc is None else "client-error"
        except asyncio.CancelledError:
            pump.cancel()
            self.upstream.abort()
            self.transport.abort()
            raise
        finally:
            self.client.end_tunnel()

    async def _pump(self) -> str:
        up = self.upstream
        transport = self.transport
        flow = self.client.flow
        try:
            while True:
                data = await up.read()
                if not data:
                    transport.close()  # flushes what was written first
                    return "upstream-closed"
                self.to_client += len(data)
                transport.write(data)
                if flow.write_paused:
                    await flow.drain()
                if transport.is_closing():
                    up.close()
                    return "client-closed"
        except OSError as exc:
            log.info("a WebSocket upstream broke (%s): aborting the client connection",
                     type(exc).__name__)
            transport.abort()
            return "upstream-error"


__all__ = ["HIGH_WATER", "Tunnel"]
