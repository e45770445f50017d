"""A fault-controllable upstream HTTP server, for tests, the demo and fault drills.

Why not uvicorn: a fault server must do things a well-behaved server never does
(stop listening and come back on the same port, reset a connection half way through a
body, hang forever while noticing that the client went away). A small asyncio server
speaking HTTP/1.1 through h11 gives that control exactly, with no timing guesswork.

Two ways to run it:

* in-process: ``FaultServer(name="a").start()`` runs it on its own event loop in a
  daemon thread (works from sync and async tests alike); ``server.set(mode="hang")``,
  ``server.recover()``, ``server.hits``... change and read it at runtime;
* as a subprocess: ``python -m riprap_testing.faults --port 9001 --control-port 9081 --name a``
  prints ``READY <port> <control-port>`` and is driven over HTTP on the control port
  (``POST /mode`` with a JSON object, ``POST /recover``, ``GET /stats``), which keeps
  answering while the data port refuses. ``FaultProcess`` wraps that.

Modes (``mode=``): ``ok``; ``refuse`` (the listening socket is closed, so connects are
refused); ``reset`` (headers and part of the body, then the connection is aborted);
``close`` (the connection is closed before any answer); ``hang`` (never answers; a client
going away is counted in ``disconnects``). Independent knobs: ``delay`` (seconds before
answering: "slow"), ``error_rate`` (fraction of answers that are ``error_status``),
``fail_next`` (the next N answers are ``error_status``), ``retry_after`` (a Retry-After
header on error answers). ``recover()`` returns to plain ``ok``.

Paths: any path answers a small JSON document naming the server, the request line and
headers and the hit number; ``/echo`` answers the request body back; ``/sse?n=N&interval=S``
streams N server-sent events S seconds apart; ``/chunked?n=N&interval=S&size=B`` streams
N chunks; ``/status/CODE`` answers CODE; ``?delay=S`` delays one answer. The same control
routes as the control port are also served under ``/__fault/`` on the data port.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Deque
from urllib.parse import parse_qs, urlsplit

import h11

MODES = ("ok", "refuse", "reset", "close", "hang")


@dataclass
class FaultConfig:
    """How the server misbehaves right now. Replaced as a whole on every change."""

    mode: str = "ok"
    delay: float = 0.0
    error_rate: float = 0.0
    error_status: int = 503
    fail_next: int = 0
    retry_after: str | None = None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be within 0..1")
        if self.delay < 0:
            raise ValueError("delay must not be negative")


@dataclass
class FaultStats:
    hits: int = 0
    in_flight: int = 0
    disconnects: int = 0  # clients that went away before their answer was complete
    by_path: dict[str, int] = field(default_factory=dict)
    recent: Deque[dict[str, Any]] = field(default_factory=lambda: collections.deque(maxlen=64))


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound and released; good enough for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Core:
    """The server itself; lives on one event loop."""

    def __init__(self, name: str, host: str, port: int, control_port: int | None,
                 seed: int) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.control_port = control_port
        self.config = FaultConfig()
        self.stats = FaultStats()
        self._rng = random.Random(seed)
        self._server: asyncio.base_events.Server | None = None
        self._control: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # -- lifecycle ---------------------------------------------------------------
    async def listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            lambda r, w: self._serve(r, w, control_only=False),
            self.host, self.port, reuse_address=True, backlog=512,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def unlisten(self) -> None:
        """Stop accepting: new connects are refused; open connections are dropped."""
        if self._server is None:
            return
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def start(self) -> None:
        await self.listen()
        if self.control_port is not None:
            self._control = await asyncio.start_server(
                lambda r, w: self._serve(r, w, control_only=True),
                self.host, self.control_port, reuse_address=True,
            )
            self.control_port = self._control.sockets[0].getsockname()[1]

    async def close(self) -> None:
        await self.unlisten()
        if self._control is not None:
            self._control.close()
            await self._control.wait_closed()
            self._control = None

    async def apply(self, **changes: Any) -> FaultConfig:
        cfg = replace(self.config, **changes)
        cfg.validate()
        self.config = cfg
        if cfg.mode == "refuse":
            await self.unlisten()
        else:
            await self.listen()
        return cfg

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "port": self.port,
            "listening": self._server is not None,
            "config": asdict(self.config),
            "hits": self.stats.hits,
            "in_flight": self.stats.in_flight,
            "disconnects": self.stats.disconnects,
            "by_path": dict(self.stats.by_path),
        }

    # -- HTTP ----------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     control_only: bool) -> None:
        if not control_only:  # control connections survive `refuse`
            self._writers.add(writer)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req, body = await self._read_request(conn, reader)
                if req is None:
                    return
                keep = await self._dispatch(conn, reader, writer, req, body, control_only)
                if not keep or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            raise
        finally:
            self._writers.discard(writer)
            try:
                writer.close()
            except RuntimeError:  # loop already closing
                pass

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader
                            ) -> tuple[h11.Request | None, bytes]:
        req: h11.Request | None = None
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and req is None:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                req = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return req, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, event: Any) -> None:
        data = conn.send(event)
        if data:
            writer.write(data)
            await writer.drain()

    async def _answer(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int,
                      body: bytes, ctype: str = "application/json",
                      extra: list[tuple[str, str]] | None = None) -> None:
        headers = [("content-type", ctype), ("x-fault-server", self.name)] + (extra or [])
        if status not in (204, 304):
            headers.append(("content-length", str(len(body))))
        await self._send(conn, writer, h11.Response(status_code=status, headers=headers))
        if not getattr(conn, "riprap_head", False) and status not in (204, 304):
            await self._send(conn, writer, h11.Data(data=body))  # HEAD: headers only
        await self._send(conn, writer, h11.EndOfMessage())

    async def _wait_or_gone(self, reader: asyncio.StreamReader, conn: h11.Connection,
                            seconds: float | None) -> bool:
        """Wait `seconds` (None: forever); False when the client went away meanwhile."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return True
            try:
                data = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                return True
            if not data:
                self.stats.disconnects += 1
                return False
            conn.receive_data(data)  # pipelined bytes: keep them for the next cycle

    async def _dispatch(self, conn: h11.Connection, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, req: h11.Request, body: bytes,
                        control_only: bool) -> bool:
        target = req.target.decode("latin-1")
        parts = urlsplit(target)
        path = parts.path
        multi = parse_qs(parts.query)
        query = {k: v[-1] for k, v in multi.items()}
        extra = [(h.split(":", 1)[0], h.split(":", 1)[1].strip()) for h in multi.get("hdr", [])
                 if ":" in h]
        method = req.method.decode()
        conn.riprap_head = method == "HEAD"  # type: ignore[attr-defined]
        if control_only or path.startswith("/__fault/"):
            route = path[len("/__fault"):] if path.startswith("/__fault/") else path
            await self._control_route(conn, writer, method, route, body)
            return True

        st = self.stats
        st.hits += 1
        st.by_path[path] = st.by_path.get(path, 0) + 1
        hit = st.hits
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in req.headers]
        st.recent.append({"method": method, "target": target, "headers": headers, "hit": hit})
        cfg = self.config
        st.in_flight += 1
        try:
            if cfg.mode == "close":
                writer.transport.abort()
                return False
            if cfg.mode == "hang":
                await self._wait_or_gone(reader, conn, None)
                writer.transport.abort()
                return False
            delay = cfg.delay + float(query.get("delay", 0) or 0)
            if delay > 0 and not await self._wait_or_gone(reader, conn, delay):
                return False
            if cfg.mode == "reset":
                await self._send(conn, writer, h11.Response(status_code=200, headers=[
                    ("content-type", "application/octet-stream"),
                    ("content-length", "100000"), ("x-fault-server", self.name)]))
                await self._send(conn, writer, h11.Data(data=b"x" * 1000))
                await asyncio.sleep(0.01)
                writer.transport.abort()
                return False
            failing = False
            if cfg.fail_next > 0:
                cfg.fail_next -= 1
                failing = True
            elif cfg.error_rate > 0 and self._rng.random() < cfg.error_rate:
                failing = True
            if failing:
                extra = [("retry-after", cfg.retry_after)] if cfg.retry_after else []
                doc = {"server": self.name, "error": True, "hit": hit}
                await self._answer(conn, writer, cfg.error_status, json.dumps(doc).encode(),
                                   extra=extra)
                return True
            return await self._content(conn, reader, writer, method, target, path, query,
                                       headers, body, hit, extra)
        finally:
            st.in_flight -= 1

    async def _content(self, conn: h11.Connection, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, method: str, target: str, path: str,
                       query: dict[str, str], headers: list[tuple[str, str]], body: bytes,
                       hit: int, extra: list[tuple[str, str]]) -> bool:
        if path == "/echo":
            await self._answer(conn, writer, 200, body, ctype="application/octet-stream")
            return True
        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            doc = {"server": self.name, "status": code, "hit": hit}
            await self._answer(conn, writer, code, json.dumps(doc).encode())
            return True
        if path in ("/sse", "/chunked"):
            n = int(query.get("n", 3))
            interval = float(query.get("interval", 0.2))
            size = int(query.get("size", 16))
            ctype = "text/event-stream" if path == "/sse" else "application/octet-stream"
            await self._send(conn, writer, h11.Response(status_code=200, headers=[
                ("content-type", ctype), ("cache-control", "no-cache"),
                ("x-fault-server", self.name)]))
            for i in range(n):
                chunk = (f"id: {i}\ndata: {self.name} {i}\n\n".encode() if path == "/sse"
                         else bytes([65 + i % 26]) * size)
                await self._send(conn, writer, h11.Data(data=chunk))
                if i < n - 1 and not await self._wait_or_gone(reader, conn, interval):
                    return False
            await self._send(conn, writer, h11.EndOfMessage())
            return True
        doc = {"server": self.name, "port": self.port, "method": method, "target": target,
               "headers": headers, "body_bytes": len(body), "hit": hit}
        await self._answer(conn, writer, 200, json.dumps(doc).encode(), extra=extra)
        return True

    async def _control_route(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                             method: str, route: str, body: bytes) -> None:
        try:
            if route == "/stats" and method == "GET":
                doc: Any = self.snapshot()
            elif route == "/mode" and method == "POST":
                changes = json.loads(body or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("POST /mode takes a JSON object")
                await self.apply(**changes)
                doc = self.snapshot()
            elif route == "/recover" and method == "POST":
                await self.apply(**asdict(FaultConfig()))
                doc = self.snapshot()
            elif route == "/reset-stats" and method == "POST":
                self.stats = FaultStats()
                doc = self.snapshot()
            else:
                await self._answer(conn, writer, 404, b'{"error": "no such control route"}')
                return
        except (ValueError, TypeError) as exc:
            await self._answer(conn, writer, 400, json.dumps({"error": str(exc)}).encode())
            return
        await self._answer(conn, writer, 200, json.dumps(doc).encode())


class FaultServer:
    """An in-process fault server on its own loop in a daemon thread.

    ``start()`` returns self once the port listens; every control method blocks until the
    change is in force, so a test can flip a mode and send the next call at once.
    """

    def __init__(self, name: str = "upstream", port: int = 0, host: str = "127.0.0.1",
                 control_port: int | None = None, seed: int = 0) -> None:
        self._core = _Core(name, host, port, control_port, seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def port(self) -> int:
        return self._core.port

    @property
    def control_port(self) -> int | None:
        return self._core.control_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._core.port}"

    def start(self) -> "FaultServer":
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self._core.start())
            except BaseException as exc:  # noqa: BLE001 - report the bind failure to the caller
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._core.close())
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, name=f"fault-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None, "FaultServer is not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def set(self, **changes: Any) -> FaultConfig:
        """Change some knobs (mode, delay, error_rate, error_status, fail_next, retry_after)."""
        config: FaultConfig = self._call(self._core.apply(**changes))
        return config

    def recover(self) -> None:
        """Back to a healthy, listening server with every knob at its default."""
        self._call(self._core.apply(**asdict(FaultConfig())))

    def reset_stats(self) -> None:
        async def clear() -> None:
            self._core.stats = FaultStats()
        self._call(clear())

    @property
    def config(self) -> FaultConfig:
        return self._core.config

    @property
    def hits(self) -> int:
        return self._core.stats.hits

    @property
    def in_flight(self) -> int:
        return self._core.stats.in_flight

    @property
    def disconnects(self) -> int:
        return self._core.stats.disconnects

    def hits_for(self, path: str) -> int:
        return self._core.stats.by_path.get(path, 0)

    @property
    def recent(self) -> list[dict[str, Any]]:
        return list(self._core.stats.recent)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FaultProcess:
    """The fault server as a subprocess (``python -m riprap_testing.faults``), driven over HTTP."""

    def __init__(self, name: str = "upstream", port: int = 0, control_port: int = 0) -> None:
        self.name = name
        self.port = port or free_port()
        self.control_port = control_port or free_port()
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "FaultProcess":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "riprap_testing.faults", "--name", self.name, "--port",
             str(self.port), "--control-port", str(self.control_port)],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"fault server {self.name} did not start: {line!r}")
        return self

    def _control(self, method: str, route: str, doc: dict[str, Any] | None = None) -> Any:
        data = json.dumps(doc).encode() if doc is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(f"http://127.0.0.1:{self.control_port}{route}",
                                     data=data, method=method)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=10) as resp:
            return json.loads(resp.read())

    def set(self, **changes: Any) -> dict[str, Any]:
        return self._control("POST", "/mode", changes)  # type: ignore[no-any-return]

    def recover(self) -> dict[str, Any]:
        return self._control("POST", "/recover")  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        return self._control("GET", "/stats")  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> "FaultProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _main_async(args: argparse.Namespace) -> None:
    core = _Core(args.name, args.host, args.port, args.control_port, args.seed)
    await core.start()
    if args.mode != "ok" or args.delay or args.error_rate:
        await core.apply(mode=args.mode, delay=args.delay, error_rate=args.error_rate,
                         error_status=args.error_status, retry_after=args.retry_after)
    print(f"READY {core.port} {core.control_port or ''}".rstrip(), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await core.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m riprap_testing.faults",
                                description="A fault-controllable upstream HTTP server.")
    p.add_argument("--name", default="upstream")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--control-port", type=int, default=None)
    p.add_argument("--mode", choices=MODES, default="ok")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--error-status", type=int, default=503)
    p.add_argument("--retry-after", default=None)
    p.add_argument("--seed", type=int, default=int(os.environ.get("FAULT_SEED", "0")))
    args = p.parse_args(argv)
    try:
        asyncio.run(_main_async(args))
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
