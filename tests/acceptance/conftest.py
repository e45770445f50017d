"""The one place the acceptance tests start "the sidecar for this policy".

Every sidecar of these tests comes from the `run_sidecar` fixture (a `riprap run` subprocess,
`acc_kit.Sidecar`), so a parameter for which engine runs the plan is added here, once.
Each sidecar it started is stopped when the module's tests are done (a test may stop one
earlier itself: stopping twice is harmless).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from acc_kit import RunSidecar, Sidecar, Upstream, free_port


@pytest.fixture(scope="module")
def run_sidecar() -> Iterator[RunSidecar]:
    """`run_sidecar(policy, *args, port=None, admin=None, admin_host=..., cwd=None)`: a started,
    ready sidecar for `policy` (free loopback ports unless given)."""
    started: list[Sidecar] = []

    def run(policy: Path, *args: str, port: int | None = None, admin: int | None = None,
            admin_host: str = "127.0.0.1", cwd: Path | None = None,
            timeout: float = 15.0) -> Sidecar:
        sc = Sidecar(policy, port if port is not None else free_port(),
                     admin if admin is not None else free_port(), *args,
                     admin_host=admin_host, cwd=cwd)
        started.append(sc)
        return sc.start(timeout)

    yield run
    for sc in reversed(started):
        sc.stop()


@pytest.fixture(scope="module")
def ups() -> Iterator[dict[str, Any]]:
    """Upstreams A, B and C (`acc_kit.Upstream`, one per test file) and a port nothing listens on."""
    a, b, c = Upstream("A"), Upstream("B"), Upstream("C")
    yield {"A": a, "B": b, "C": c, "DEAD": free_port()}
    a.close()
    b.close()
    c.close()
