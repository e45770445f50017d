"""Supervising the app (contract section 6): start it, restart it, stop it.

The command runs through `/bin/sh -c` in its own process group, so shell syntax works
and stopping signals the whole group (the shell and everything it started). The app is
restarted when it exits (for any reason, as systemd's `Restart=always`) or when its health
check fails `fall` times in a row. Between restarts the supervisor waits with exponential
backoff (`restart backoff A..B`: A, 2A, 4A, ... up to B), and the backoff starts over once
the app has been healthy (or, with no health check, running) for a minute. Stopping sends
SIGTERM to the group, then SIGKILL after `stop_timeout` (10 s).

`fall` failed checks in a row restart the app. A start grace, where the contract is
silent (as Docker's `--start-period`, or a Kubernetes startup probe): until the app first
answers a check, a check that finds nothing listening on the health URL (connection
refused) does not count during the first `START_GRACE` seconds after the start, so an app
that needs a few seconds to bind its port is not killed in a restart loop on a busy
machine. A check the app answers (any status but 2xx, or too late) always counts, and so
does every check once the app has answered one or once the grace is over: a never-healthy
app is still restarted after `fall` checks, and one that never listens `START_GRACE` +
`fall x every` after its start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

import httpx

from dsl.plan import SuperviseSpec

log = logging.getLogger("riprap.supervisor")

START_GRACE = 2.0  # seconds after a start in which "nothing listening yet" is not a failure


class Supervisor:
    """Runs one app command and keeps it alive. All methods run on the sidecar's loop."""

    def __init__(self, app: str, spec: SuperviseSpec, metrics: Any) -> None:
        self.app = app
        self.spec = spec
        self.metrics = metrics
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.consecutive = 0  # restarts since the app was last healthy for a while
        self.healthy: bool | None = None
        self.last_exit: int | None = None
        self.last_cause: str | None = None
        self.started_at: float | None = None
        self._healthy_since: float | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self._kick = asyncio.Event()  # health failure or reload: restart now
        self._kick_cause = "health"
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    # -- public ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="supervisor")

    def update(self, spec: SuperviseSpec) -> None:
        """A reloaded plan changed the app block: restart the app with the new spec."""
        self.spec = spec
        self._kick_cause = "reload"
        self._kick.set()

    async def stop(self) -> None:
        """Stop supervising and stop the app: SIGTERM, then SIGKILL after `stop_timeout`."""
        self._stopping = True
        self._stopped.set()
        self._kick.set()
        if self._task is not None:
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self._terminate()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def snapshot(self) -> dict[str, Any]:
        running = self.proc is not None and self.proc.returncode is None
        return {
            "app": self.app,
            "command": self.spec.run,
            "pid": self.proc.pid if running and self.proc else None,
            "running": running,
            "healthy": self.healthy if running else None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "last_restart_cause": self.last_cause,
            "uptime": round(time.monotonic() - self.started_at, 3)
            if running and self.started_at else None,
        }

    # -- the loop -------------------------------------------------------------------------
    def backoff(self) -> float:
        """The wait before the next restart: base doubling per restart, capped at max."""
        n = max(0, self.consecutive - 1)
        return min(self.spec.restart_max, self.spec.restart_base * (2.0 ** min(n, 30)))

    async def _run(self) -> None:
        while not self._stopping:
            await self._spawn()
            cause = await self._wait_for_trouble()
            if self._stopping:
                return
            if cause != "exit":
                await self._terminate()
            elif self.proc is not None:
                # the command's process died; what it started may live on in its group
                # (a shell wrapper's child still holding the port): end it before a restart
                await self._end_group(self.proc.pid)
            self.metrics.app_running(self.app, False)
            now = time.monotonic()
            if self._healthy_since is not None and now - self._healthy_since >= self.spec.healthy_reset:
                self.consecutive = 0
            self.consecutive += 1
            self.restarts += 1
            self.last_cause = cause
            self.metrics.app_restarted(self.app, cause)
            delay = 0.0 if cause == "reload" else self.backoff()
            log.warning("app %s: restarting (%s, exit code %s) in %.2fs", self.app, cause,
                        self.last_exit, delay)
            try:
                await asyncio.wait_for(self._stopped.wait(), delay)
            except TimeoutError:
                pass

    async def _spawn(self) -> None:
        self._kick = asyncio.Event()
        self.healthy = None
        try:
            self.proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", self.spec.run, start_new_session=True)
        except OSError as exc:
            log.error("app %s: cannot start %r: %s", self.app, self.spec.run, exc)
            self.proc = None
            return
        self.started_at = time.monotonic()
        self._healthy_since = None if self.spec.health else self.started_at
        self.metrics.app_running(self.app, True)
        log.info("app %s: started pid %d: %s", self.app, self.proc.pid, self.spec.run)

    async def _wait_for_trouble(self) -> str:
        """Wait until the app exits ('exit'), fails its checks ('health') or is kicked."""
        if self.proc is None:
            return "exit"
        waiter = asyncio.ensure_future(self.proc.wait())
        kicked = asyncio.ensure_future(self._kick.wait())
        checker = asyncio.ensure_future(self._check_loop()) if self.spec.health else None
        tasks = [t for t in (waiter, kicked, checker) if t is not None]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if waiter in done:
            self.last_exit = self.proc.returncode
            log.warning("app %s: exited with code %s", self.app, self.last_exit)
            return "exit"
        if checker is not None and checker in done:
            return "health"
        return self._kick_cause

    async def _check_loop(self) -> None:
        """Return once the health check failed `fall` times in a row."""
        health = self.spec.health
        assert health is not None
        if self._client is None:
            # A new connection per probe (as kubelet does): a kept-alive one to an app that
            # was just restarted would fail the first probe for no fault of the new app.
            self._client = httpx.AsyncClient(
                trust_env=False, limits=httpx.Limits(max_keepalive_connections=0))
        failures = 0
        answered = False  # has this start of the app answered a check yet?
        graced = False
        while True:
            await asyncio.sleep(health.interval)
            ok, listening = await self._probe()
            now = time.monotonic()
            answered = answered or listening
            if ok:
                failures = 0
                if self._healthy_since is None:
                    self._healthy_since = now
                self.healthy = True
                continue
            started = self.started_at if self.started_at is not None else now
            if not answered and now - started < START_GRACE:
                if not graced:
                    graced = True
                    log.info("app %s: not listening yet; checks count once it answers one, "
                             "or %.0fs after its start", self.app, START_GRACE)
                continue
            self._healthy_since = None
            failures += 1
            self.healthy = False
            log.warning("app %s: health check failed (%d/%d)", self.app, failures, health.fall)
            if failures >= health.fall:
                return

    async def _probe(self) -> tuple[bool, bool]:
        """One check: (passed, something listening on the health URL answered or accepted)."""
        health = self.spec.health
        assert health is not None and self._client is not None
        try:
            resp = await self._client.request(health.method, health.url, timeout=health.timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            return False, False  # nothing listening (yet)
        except httpx.HTTPError:
            return False, True  # connected, then no (good) answer: a hung or broken app
        return 200 <= resp.status_code < 300, True

    async def _terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        _signal_group(proc.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        try:
            await asyncio.wait_for(proc.wait(), self.spec.stop_timeout)
        except TimeoutError:
            log.warning("app %s: still running %.0fs after SIGTERM; sending SIGKILL",
                        self.app, self.spec.stop_timeout)
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
        self.last_exit = proc.returncode
        await self._end_group(proc.pid)
        self.metrics.app_running(self.app, False)

    async def _end_group(self, pgid: int) -> None:
        """Leave nothing of the app's process group behind: SIGTERM (and SIGCONT), then
        SIGKILL after `stop_timeout` — the same rule as for the app's own process."""
        if not _group_alive(pgid):
            return
        _signal_group(pgid, signal.SIGTERM)
        _signal_group(pgid, signal.SIGCONT)
        deadline = time.monotonic() + self.spec.stop_timeout
        while _group_alive(pgid):
            if time.monotonic() >= deadline:
                log.warning("app %s: processes of its group still running %.0fs after SIGTERM;"
                            " sending SIGKILL", self.app, self.spec.stop_timeout)
                _signal_group(pgid, signal.SIGKILL)
                return
            await asyncio.sleep(0.05)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of group `pgid` remains.

    An orphan the app left behind is reparented to PID 1, which in a container may never
    reap it; a zombie still answers `killpg(pgid, 0)`, so /proc is read where there is one.
    """
    members = _live_group_members(pgid)
    if members is not None:
        return bool(members)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live_group_members(pgid: int) -> list[int] | None:
    """Pids of group `pgid` that are not zombies, from /proc; None where /proc is absent."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    members = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rfind(b")") + 2:].split()  # state, ppid, pgrp, ...
        if len(fields) > 2 and fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
            members.append(int(entry))
    return members
