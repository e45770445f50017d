"""Every process the demo starts, and the one place that stops them all.

Why a registry: the demo starts a dozen processes (upstreams, the sidecar, a baseline
checkout) and must leave none behind, whether it ends normally, on Ctrl-C or on an
exception. Each child gets its own process group (so a stop reaches whatever it forked)
and, on Linux, a parent-death signal, so even a SIGKILLed demo does not leak them.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Sequence

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent exits (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except OSError:
        pass


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class ProcessRegistry:
    """Starts children in their own process groups and stops every one of them."""

    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    children: list[Child] = field(default_factory=list)
    extra_pids: set[int] = field(default_factory=set)  # grandchildren seen (the supervised app)
    log_dir: str | None = None
    _stopped: bool = False

    def __post_init__(self) -> None:
        atexit.register(self.stop_all)

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              stdout: int | None = None) -> Child:
        out: int | IO[bytes] = subprocess.DEVNULL
        if stdout is not None:
            out = stdout
        elif self.log_dir is not None:
            out = open(os.path.join(self.log_dir, f"{name}.log"), "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            list(argv), env=env or self.env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
        )
        if not isinstance(out, int):
            out.close()
        child = Child(name, proc)
        self.children.append(child)
        return child

    def track(self, pid: int) -> None:
        """Remember a process the demo did not start itself (e.g. the supervised checkout)."""
        self.extra_pids.add(pid)

    def kill(self, child: Child, sig: int = signal.SIGKILL) -> None:
        """Kill one child's whole group now (a chaos step) and reap it."""
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            pass
        try:
            child.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def all_pids(self) -> list[int]:
        return sorted({c.pid for c in self.children} | self.extra_pids)

    def stop_all(self, grace: float = 8.0) -> list[int]:
        """SIGTERM every group, wait up to `grace` s, SIGKILL what is left. Returns survivors."""
        if self._stopped:
            return [p for p in self.all_pids() if pid_alive(p)]
        self._stopped = True
        for child in reversed(self.children):
            if child.proc.poll() is None:
                _signal_group(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children:
            left = max(0.0, deadline - time.monotonic())
            try:
                child.proc.wait(left)
            except subprocess.TimeoutExpired:
                pass
        for child in self.children:
            if child.proc.poll() is None:
                _signal_group(child.pid, signal.SIGKILL)
                child.proc.wait()
        for pid in self.extra_pids:  # the sidecar should have stopped its app; make sure
            if pid_alive(pid):
                _signal_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(pid_alive(p) for p in self.extra_pids):
            time.sleep(0.05)
        for pid in self.extra_pids:
            if pid_alive(pid):
                _signal_pid(pid, signal.SIGKILL)
        time.sleep(0.05)
        return [p for p in self.all_pids() if pid_alive(p)]


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
