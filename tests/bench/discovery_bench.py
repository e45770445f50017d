"""What service discovery costs: a pool of 200 addresses re-resolved every second.

    .venv/bin/python tests/bench/discovery_bench.py [--seconds 15] [--addresses 200]

The DNS server (tests/dns_kit.py, dnslib) runs in a child process, so its CPU is not
counted. It answers with at most 1232 bytes over UDP, as a real server does for the
EDNS size riprap asks, so a 200-address answer comes back truncated and is fetched again
over TCP: the dear path. This process runs a `ResilientTransport` whose plan has one
`endpoint http://pool.bench:8080 resolve every 1s` line, and measures its own CPU time
(user + system, `getrusage`) over the window, in two runs:

- steady: the same addresses at every lookup (the common case: nothing to swap);
- churn: 20 of the addresses replaced at every lookup (a rollout that never ends:
  the line's endpoints are rebuilt and the shard's pool swapped every second).

Printed: lookups, CPU ms per lookup, and the share of one core. Target: under 1 %.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from dsl.plan import EndpointSpec, Plan, ServicePlan  # noqa: E402
from policies import ResilientTransport  # noqa: E402

SERVER = """
import sys, time, threading
sys.path.insert(0, sys.argv[1])
from dns_kit import FakeDns
n, churn = int(sys.argv[2]), sys.argv[3] == "churn"
dns = FakeDns(udp_limit=1232).start()
pool = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(n)]
dns.set("pool.bench", a=pool)
print(dns.port, flush=True)
k = 0
while True:
    time.sleep(1.0)
    if churn:  # replace 20 addresses: a rolling update
        k += 1
        fresh = [f"10.1.{k % 250}.{i + 1}" for i in range(20)]
        dns.set("pool.bench", a=pool[20:] + fresh)
        pool = pool[20:] + fresh
"""


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run(port: int, seconds: float) -> tuple[int, float, float, int]:
    svc = ServicePlan(name="pool", endpoints=(EndpointSpec("http://pool.bench:8080",
                                                           resolve=1.0),))
    plan = Plan(app="bench", services={"pool": svc}, resolver=(f"127.0.0.1:{port}",))
    transport = ResilientTransport(plan, httpx.MockTransport(lambda r: httpx.Response(200)))
    await transport.start()
    line = transport.snapshot()["services"]["pool"]["lines"][0]
    assert len(line["addresses"]) > 0, line
    t0, c0, l0 = time.monotonic(), cpu(), line["lookups"]
    await asyncio.sleep(seconds)
    wall, used = time.monotonic() - t0, cpu() - c0
    line = transport.snapshot()["services"]["pool"]["lines"][0]
    await transport.aclose()
    return line["lookups"] - l0, used, wall, len(line["addresses"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--addresses", type=int, default=200)
    args = ap.parse_args()
    worst = 0.0
    for mode in ("steady", "churn"):
        child = subprocess.Popen([sys.executable, "-c", SERVER, str(ROOT / "tests"),
                                  str(args.addresses), mode], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            port = int(child.stdout.readline())
            lookups, used, wall, count = asyncio.run(run(port, args.seconds))
        finally:
            child.kill()
            child.wait()
        share = used / wall * 100
        worst = max(worst, share)
        print(f"{mode:6s}: {count} addresses, {lookups} lookups in {wall:.1f} s, "
              f"{used * 1000 / max(lookups, 1):.2f} ms CPU per lookup, "
              f"{share:.2f} % of one core   (target < 1 %)", flush=True)
    return 0 if worst < 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
