"""The demo's upstream fleet: payments, inventory and recommendations replicas.

Each replica is one `riprap_testing.faults` server in its own process (so "kill a replica" is a
real SIGKILL, and "heal" starts a fresh process on the same port), driven over its
control port (`POST /mode`, `POST /recover`) for the softer faults: 503s, slowness.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aiohttp

from sidecar.demo.layout import Layout, Upstream
from sidecar.demo.processes import Child, ProcessRegistry


class Fleet:
    def __init__(self, layout: Layout, registry: ProcessRegistry, session: aiohttp.ClientSession,
                 seed: int = 7) -> None:
        self.layout = layout
        self.registry = registry
        self.session = session
        self.seed = seed
        self.procs: dict[str, Child] = {}
        self.down: set[str] = set()

    def _spawn(self, up: Upstream) -> None:
        argv = [sys.executable, "-m", "riprap_testing.faults", "--name", up.name, "--port",
                str(up.port), "--control-port", str(up.control_port),
                "--seed", str(self.seed + up.port % 97)]
        self.procs[up.name] = self.registry.start(up.name, argv)

    async def start(self, timeout: float = 15.0) -> None:
        for up in self.layout.upstreams:
            self._spawn(up)
        await asyncio.gather(*(self._wait_ready(u, timeout) for u in self.layout.upstreams))

    async def _wait_ready(self, up: Upstream, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            proc = self.procs[up.name].proc
            if proc.poll() is not None:
                raise RuntimeError(f"upstream {up.name} exited with code {proc.returncode} "
                                   f"(is 127.0.0.1:{up.port} free?)")
            try:
                await self.control(up.name, "GET", "/stats")
                return
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.05)
        raise RuntimeError(f"upstream {up.name} did not start within {timeout:.0f}s")

    async def control(self, name: str, method: str, route: str,
                      doc: dict[str, Any] | None = None) -> Any:
        up = self.layout.upstream(name)
        async with self.session.request(method, f"http://127.0.0.1:{up.control_port}{route}",
                                        json=doc, timeout=aiohttp.ClientTimeout(total=2)) as r:
            r.raise_for_status()
            return await r.json()

    async def set(self, name: str, **changes: Any) -> None:
        await self.control(name, "POST", "/mode", changes)

    def kill(self, name: str) -> None:
        """SIGKILL the replica's process: connections refused from now on."""
        self.registry.kill(self.procs[name])
        self.down.add(name)

    async def heal(self) -> None:
        """Restart killed replicas and clear every fault on the others."""
        for name in sorted(self.down):
            self._spawn(self.layout.upstream(name))
        revived = [self.layout.upstream(n) for n in sorted(self.down)]
        self.down.clear()
        await asyncio.gather(*(self._wait_ready(u, 10.0) for u in revived))
        await asyncio.gather(*(self.control(u.name, "POST", "/recover")
                               for u in self.layout.upstreams))
