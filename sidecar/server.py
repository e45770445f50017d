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

Forward-proxy requests (`HTTP_PROXY`) carry an absolute-form target; uvicorn's httptools
protocol keeps only its path, so `RiprapHttpTools` records the target's host in the scope
for the router (an unknown host must get 403, not be routed by path).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
from typing import Any, Iterator

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sidecar.app import Sidecar
from sidecar.proxy import QuietBrokenBodies
from sidecar.routing import ABSOLUTE_TARGET_KEY

log = logging.getLogger("riprap.server")


class RiprapHttpTools(HttpToolsProtocol):
    """httptools protocol that remembers an absolute-form (or CONNECT) target's host.

    A CONNECT's authority-form target (`host:443`) is not a URL httptools can parse, so it
    is handed to the app as path `/` with the authority recorded; the router refuses it
    (403/405) and the answer closes the connection, as no tunnel follows.
    """

    def on_headers_complete(self) -> None:
        url = self.url
        connect = self.parser.get_method() == b"CONNECT"
        if connect:
            self.url = b"/"
        super().on_headers_complete()
        if connect:
            self.scope[ABSOLUTE_TARGET_KEY] = url.decode("latin-1")  # type: ignore[literal-required]
            return
        if url[:1] == b"/" or url == b"*":
            return
        try:
            parsed = httptools.parse_url(url)
            host = parsed.host.decode("latin-1") if parsed.host else ""
        except httptools.HttpParserInvalidURLError:
            host = url.decode("latin-1", "replace")
        self.scope[ABSOLUTE_TARGET_KEY] = host  # type: ignore[literal-required]

    def _unsupported_upgrade_warning(self) -> None:
        if self.scope.get("method") != "CONNECT":  # CONNECT is answered by the router
            super()._unsupported_upgrade_warning()


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


def _config(app: Any, *, proxy: bool, drain_timeout: float) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=RiprapHttpTools if proxy else "httptools",
        ws="none",
        lifespan="off",
        access_log=False,
        log_config=None,
        server_header=False,
        date_header=not proxy,  # a proxy passes the upstream's Date on, it adds none
        timeout_keep_alive=75 if proxy else 5,  # nginx's default keep-alive for clients
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
        self.proxy = _Server(_config(sidecar.proxy, proxy=True, drain_timeout=drain_timeout))
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
