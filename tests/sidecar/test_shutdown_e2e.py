"""SIGTERM: readiness 503 at once, new calls served during the grace, calls in flight
drain, exit 0; none lost."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_sigterm_drains_calls_in_flight_and_exits_0(module_tmp: Path, upstreams: Any,
                                                    sidecar_proc: Any) -> None:
    up = upstreams("slow")
    policy = module_tmp / "drain.riprap"
    policy.write_text(f"app drain\n\nservice api {{\n    endpoint {up.url}\n}}\n")
    proc = sidecar_proc(policy, "--grace", "0.5", "--drain-timeout", "10").start()
    results: list[int] = []
    lock = threading.Lock()

    def call() -> None:
        with httpx.Client(base_url=proc.url, trust_env=False, timeout=20) as c:
            code = c.get("/api/work?delay=1.2").status_code
        with lock:
            results.append(code)

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    proc.wait_for(lambda: up.in_flight == 12, what="12 calls in flight")
    t0 = time.monotonic()
    proc.send(signal.SIGTERM)
    proc.wait_for(lambda: proc.admin.get("/readyz").status_code == 503, timeout=1,
                  what="readiness to turn 503")
    assert proc.client.get("/api/during-grace").status_code == 200  # still served
    for t in threads:
        t.join(20)
    assert proc.proc.wait(20) == 0, proc.logs()
    assert results == [200] * 12
    assert time.monotonic() - t0 < 5
    with pytest.raises(httpx.ConnectError):
        httpx.get(proc.url + "/api/after", timeout=2, trust_env=False)
    proc.stop()
