"""Sidecars of one app as real processes, and a bounded load generator for them.

`Sidecar(policy).start()` runs `python -m sidecar.cli run FILE` on free loopback ports
and waits for `/readyz`; `stop()` sends SIGTERM to its PID. `hammer(...)` sends GETs to
several sidecars at once for a fixed time, a few workers each, a short pause between
calls (bounded in count and time), and records every answer's status and latency.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import aiohttp
import httpx

from riprap_testing.faults import free_port

ROOT = Path(__file__).resolve().parents[2]


class Sidecar:
    """One `riprap run` process; `args` are added to its command line (`--engine envoy`),
    `env` to its environment."""

    def __init__(self, policy: Path, args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None) -> None:
        self.policy = policy
        self.args = tuple(args)
        self.extra_env = dict(env or {})
        self.port = free_port()
        self.admin_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = policy.parent / f"sidecar-{self.port}.log"
        self.admin = httpx.Client(base_url=f"http://127.0.0.1:{self.admin_port}",
                                  trust_env=False, timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "Sidecar":
        return self.launch().wait_ready(timeout)

    def launch(self) -> "Sidecar":
        """Start the process (without waiting for it: several start side by side)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
            env.pop(var, None)
        env.update(self.extra_env)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar.cli", "run", str(self.policy),
             "--listen", f"127.0.0.1:{self.port}", "--admin", f"127.0.0.1:{self.admin_port}",
             "--grace", "0", *self.args],
            cwd=str(ROOT), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self, timeout: float = 30.0) -> "Sidecar":
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited {self.proc.returncode}:\n{self.logs()}")
            try:
                if self.admin.get("/readyz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"sidecar not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.admin.close()
        self._log.close()
        return self.proc.returncode

    def state(self) -> dict[str, Any]:
        return self.admin.get("/state").json()  # type: ignore[no-any-return]

    def plan_hash(self) -> str:
        return str(self.admin.get("/plan").json()["hash"])

    def metric(self, name: str, **labels: str) -> float | None:
        want = {f'{k}="{v}"' for k, v in labels.items()}
        for line in self.admin.get("/metrics").text.splitlines():
            if line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            sample, _, rest = head.partition("{")
            if sample == name and want <= (set(rest.rstrip("}").split(",")) if rest else set()):
                return float(value)
        return None


@dataclass
class Answers:
    statuses: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds
    retry_after: list[str] = field(default_factory=list)

    def count(self, status: int) -> int:
        return sum(1 for s in self.statuses if s == status)

    def p99(self) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0

    def p50(self) -> float:
        lat = sorted(self.latencies)
        return lat[len(lat) // 2] if lat else 0.0


async def hammer(urls: list[str], seconds: float, *, workers: int = 2, pause: float = 0.004,
                 path: str = "/api/echo", headers: dict[str, str] | None = None,
                 max_calls: int = 20_000) -> list[Answers]:
    """GET `path` on every URL for `seconds`; one `Answers` per URL."""
    results = [Answers() for _ in urls]
    end = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        async def worker(i: int) -> None:
            out = results[i]
            for _ in range(max_calls):
                if time.monotonic() >= end:
                    return
                t0 = time.monotonic()
                try:
                    async with session.get(urls[i] + path, headers=headers) as r:
                        await r.read()
                        out.statuses.append(r.status)
                        if r.status == 429:
                            out.retry_after.append(r.headers.get("retry-after", ""))
                except aiohttp.ClientError:
                    out.statuses.append(0)
                out.latencies.append(time.monotonic() - t0)
                await asyncio.sleep(pause)

        await asyncio.gather(*(worker(i) for i in range(len(urls)) for _ in range(workers)))
    return results
