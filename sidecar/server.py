"""Serving: both listeners in one process, on one uvloop loop, with uvicorn + httptools.

Why one process and one loop: the proxy and the admin share the transport, the plan
holder and the metrics registry in memory, with no locks and no IPC.

Signals (handled here, not by uvicorn):

* SIGTERM / SIGINT: `/readyz` turns 503 at once; new calls are still served for a short
  grace (`--grace`, default 2 s) so that load balancers notice; then the proxy stops
  accepting, idle keep-alive connections are closed and calls in flight drain, bounded by
  `--drain-timeout` (default 15 s, calls still running then are cancelled); the supervised
  app is stopped (SIGTERM, SIGKILL after 10 s); the process exits 0. A second signal
  skips the grace.
* SIGHUP: reload the plan (as a file change would).

The HTTP protocol of both listeners is uvicorn's httptools one as hardened in
`sidecar.uvicorn_compat` (request targets as sent, head limits and timeouts, HTTP/1.0
framing, WebSocket tunnels). At start the process raises its open-file soft limit to the
hard limit, so many idle clients exhaust neither listener.

`RIPRAP_HEAD_TIMEOUT` (seconds, default 10) sets how long a client may take to send a
whole request head; it exists for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import socket
from typing import Any, Iterator

import uvicorn

from sidecar.app import Sidecar
from sidecar.proxy import QuietBrokenBodies
from sidecar.uvicorn_compat import HEAD_TIMEOUT, KEEP_ALIVE_TIMEOUT, log_fast_paths, protocol_class

log = logging.getLogger("riprap.server")


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the sidecar."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AddressError(ValueError):
    """A listen/admin address that cannot be parsed or bound."""


def parse_address(addr: str) -> tuple[str, int]:
    """`HOST:PORT` / `[IPv6]:PORT` -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise AddressError(f"bad address {addr!r}: expected HOST:PORT such as 127.0.0.1:7400")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def bind(addr: str) -> socket.socket:
    host, port = parse_address(addr)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AddressError(f"cannot listen on {addr}: {exc.strerror or exc}") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit; (soft, hard) afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft, hard


def head_timeout() -> float:
    """`RIPRAP_HEAD_TIMEOUT` (seconds) or the default, 10 s."""
    raw = os.environ.get("RIPRAP_HEAD_TIMEOUT")
    try:
        value = float(raw) if raw else HEAD_TIMEOUT
    except ValueError:
        value = HEAD_TIMEOUT
    return value if value > 0 else HEAD_TIMEOUT


def _config(app: Any, *, proxy: bool, drain_timeout: float, hooks: Any = None) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=protocol_class(hooks=hooks, head_timeout=head_timeout(), keep_case=proxy),
        ws="none",
        lifespan="off",
        access_log=False,
        log_config=None,
        server_header=False,
        date_header=not proxy,  # a proxy passes the upstream's Date on, it adds none
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT,  # an idle client is not kept (contract: 5 s)
        timeout_graceful_shutdown=int(max(1, drain_timeout)) if proxy else 1,
        backlog=2048,
        proxy_headers=False,  # X-Forwarded-* are the app's business, passed on untouched
    )


class SidecarServer:
    """Runs a `Sidecar` on two sockets until SIGTERM/SIGINT, then drains and returns 0."""

    def __init__(self, sidecar: Sidecar, proxy_sock: socket.socket, admin_sock: socket.socket,
                 *, grace: float = 2.0, drain_timeout: float = 15.0) -> None:
        self.sidecar = sidecar
        self.proxy_sock = proxy_sock
        self.admin_sock = admin_sock
        self.grace = grace
        self.drain_timeout = drain_timeout
        self.proxy = _Server(_config(sidecar.proxy, proxy=True, drain_timeout=drain_timeout,
                                     hooks=sidecar.proxy))
        self.admin = _Server(_config(sidecar.admin, proxy=False, drain_timeout=drain_timeout))
        self._term = asyncio.Event()
        self._signals = 0
        sidecar.listeners = {"proxy": _name(proxy_sock), "admin": _name(admin_sock)}
        logging.getLogger("uvicorn.error").addFilter(QuietBrokenBodies())

    def _on_term(self) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("shutdown requested: readiness is now 503; serving for %.1fs more, "
                     "then draining", self.grace)
        else:
            self.grace = 0.0
        self.sidecar.holder.draining = True
        self.sidecar.metrics.draining = True
        self._term.set()

    def _on_hup(self) -> None:
        log.info("SIGHUP: reloading the plan")
        asyncio.get_running_loop().create_task(self.sidecar.holder.reload("SIGHUP"))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        soft, hard = raise_open_file_limit()
        log.debug("open-file limit: %d (hard %d)", soft, hard)
        log_fast_paths()
        await self.sidecar.start()
        # Everything loaded so far lives as long as the process: move it out of the
        # collector's sight, so each collection only walks per-call garbage.
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_term)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        proxy_task = loop.create_task(self.proxy.serve(sockets=[self.proxy_sock]))
        admin_task = loop.create_task(self.admin.serve(sockets=[self.admin_sock]))
        h = self.sidecar.holder
        log.info("riprap: app %s, plan %s; proxy on %s, admin on %s%s", h.plan.app,
                 h.digest[:12], _name(self.proxy_sock), _name(self.admin_sock),
                 " (chaos on)" if self.sidecar.chaos else "")
        try:
            term = loop.create_task(self._term.wait())
            done, _ = await asyncio.wait({term, proxy_task, admin_task},
                                         return_when=asyncio.FIRST_COMPLETED)
            if term not in done:
                term.cancel()
                log.error("a listener stopped unexpectedly; shutting down")
                self.sidecar.holder.draining = True
            else:
                await self._sleep_grace()
            self.proxy.should_exit = True
            await proxy_task
            log.info("proxy drained")
        finally:
            await self.sidecar.aclose()
            self.admin.should_exit = True
            await admin_task
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("riprap stopped")
        return 0

    async def _sleep_grace(self) -> None:
        end = loop_time() + self.grace
        while loop_time() < end and self.grace > 0:  # a second signal zeroes the grace
            await asyncio.sleep(min(0.05, max(0.0, end - loop_time())))


def loop_time() -> float:
    return asyncio.get_running_loop().time()


def _name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def run_forever(coro_factory: Any) -> int:
    """Run a coroutine on a uvloop loop (asyncio's own loop when uvloop is missing)."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return int(runner.run(coro_factory()))
