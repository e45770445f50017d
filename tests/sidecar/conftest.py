"""Real-socket fixtures for the sidecar: fault-controllable upstreams and sidecar processes.

Upstreams are `riprap_testing.faults.FaultServer`s (in-process, each on its own loop and thread,
on a free 127.0.0.1 port). The sidecar runs as a real subprocess
(`python -m sidecar.cli run FILE`) on free ports; `start()` waits for `/readyz`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from riprap_testing.faults import FaultServer, free_port

ROOT = Path(__file__).resolve().parents[2]


class SidecarProc:
    """`riprap run` as a subprocess on free loopback ports."""

    def __init__(self, policy: Path, *args: str, cwd: Path | None = None,
                 command: list[str] | None = None) -> None:
        self.policy = policy
        self.args = list(args)
        self.port = free_port()
        self.admin_port = free_port()
        self.cwd = cwd or policy.parent
        self.command = command or [sys.executable, "-m", "sidecar.cli", "run"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.out_path = self.cwd / f"sidecar-{self.port}.out"
        self.err_path = self.cwd / f"sidecar-{self.port}.err"
        self.client = httpx.Client(base_url=self.url, trust_env=False, timeout=20)
        self.admin = httpx.Client(base_url=self.admin_url, trust_env=False, timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 20.0) -> "SidecarProc":
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
            env.pop(var, None)
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(
            [*self.command, str(self.policy), "--listen", f"127.0.0.1:{self.port}",
             "--admin", f"127.0.0.1:{self.admin_port}", *self.args],
            cwd=str(ROOT), stdout=self._out, stderr=self._err, env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                logs = self.logs()
                self.stop()
                raise AssertionError(f"sidecar exited with {self.proc.returncode}:\n{logs}")
            try:
                if self.admin.get("/readyz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        logs = self.logs()
        self.stop(signal.SIGKILL)
        raise AssertionError(f"sidecar not ready after {timeout}s:\n{logs}")

    def logs(self) -> str:
        out = self.out_path.read_text(errors="replace") if self.out_path.exists() else ""
        err = self.err_path.read_text(errors="replace") if self.err_path.exists() else ""
        return f"--- stdout\n{out}\n--- stderr\n{err}"

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the sidecar and wait for it; its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()
        self.admin.close()
        self._out.close()
        self._err.close()
        return self.proc.returncode

    def plan(self) -> dict[str, Any]:
        return self.admin.get("/plan").json()  # type: ignore[no-any-return]

    def metrics(self) -> str:
        return self.admin.get("/metrics").text

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample (0.0 when absent)."""
        want = {f'{k}="{v}"' for k, v in labels.items()}
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            sample, _, rest = head.partition("{")
            if sample != name:
                continue
            got = set(rest.rstrip("}").split(",")) if rest else set()
            if want <= got:
                return float(value)
        return 0.0

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0,
                 what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Callable[[str], FaultServer]]:
    """A factory of fault servers that are all stopped at the end of the module."""
    started: list[FaultServer] = []

    def make(name: str) -> FaultServer:
        server = FaultServer(name=name).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sidecar")


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def sidecar_proc() -> type[SidecarProc]:
    return SidecarProc


@pytest.fixture(scope="session")
def until() -> Callable[..., None]:
    return wait_until
