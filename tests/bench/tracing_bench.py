"""What tracing costs: the sidecar with no OTEL_* variables, then with OTLP/HTTP export on.

    .venv/bin/python tests/bench/tracing_bench.py [--duration 3] [--rounds 3] [--engine envoy]

The same setup as proxy_bench.py (nginx upstream and wrk on core 0, the sidecar alone on
core 1; best of interleaved rounds): the sidecar (a) without tracing variables, (b) with
`OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a local OTLP/HTTP sink that answers 200 (the SDK's
default sampler, parentbased_always_on: every call traced, two spans or more a call).
Printed: rps, p50 and p99 at c=32 and c=1 for both, and the spans the sink received.
With `--engine envoy` the same two runs are `riprap run --engine envoy` (Envoy's own
OpenTelemetry tracer). Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("proxy_bench", HERE / "proxy_bench.py")
assert _spec is not None and _spec.loader is not None
pb: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pb)


class Sink:
    """An OTLP/HTTP endpoint that counts the export requests and bytes it is sent."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                if "chunked" in self.headers.get("transfer-encoding", "").lower():
                    n = 0  # Envoy's exporter sends its body chunked
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        n += len(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                else:
                    n = int(self.headers.get("content-length", "0"))
                    self.rfile.read(n)
                sink.requests += 1
                sink.bytes += n
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engine", choices=("python", "envoy"), default="python")
    args = ap.parse_args()
    if not pb.ensure_tools():
        return 0
    work = Path(tempfile.mkdtemp(prefix="riprap-tracing-bench-"))
    procs = []
    sink = Sink()
    try:
        up_port = pb.free_port()
        conf = pb.nginx_conf(work, "upstream", f"""
            server {{
                listen 127.0.0.1:{up_port} reuseport;
                location / {{ default_type text/plain; return 200 "{pb.BODY.strip()}\\n"; }}
            }}""")
        procs.append(pb.start(pb.pin(pb.LOAD_CORE, ["nginx", "-c", str(conf), "-p", str(work)])))
        up = f"http://127.0.0.1:{up_port}"
        pb.wait_http(up + "/")
        policy = work / "bench.riprap"
        pb.write_plan(policy, up)
        targets = {}
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        for name, extra in (("off", {}), ("on", {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.url})):
            port, admin = pb.free_port(), pb.free_port()
            procs.append(pb.start(pb.pin(pb.FORWARDER_CORE, [
                pb.PY, "-m", "sidecar.cli", "run", str(policy), "--listen", f"127.0.0.1:{port}",
                "--admin", f"127.0.0.1:{admin}", "--log-level", "warning", "--grace", "0",
                "--engine", args.engine]),
                env={**base_env, **extra}))
            targets[name] = f"http://127.0.0.1:{port}/"
        for url in targets.values():
            pb.wait_http(url, host="bench")
            pb.wrk(url, 32, 1)
        for conns in (32, 1):
            runs: dict[str, list[dict[str, float]]] = {n: [] for n in targets}
            for _ in range(args.rounds):
                for name, url in targets.items():
                    runs[name].append(pb.wrk(url, conns, args.duration))
            for name in targets:
                best = max(runs[name], key=lambda r: r["rps"])
                print(f"tracing {name:3s} c={conns:<2d} {best['rps']:9.0f} rps  p50 "
                      f"{best['p50']:6.3f} ms  p99 {best['p99']:6.3f} ms  "
                      f"non-2xx {int(sum(r['non2xx'] for r in runs[name]))}", flush=True)
        print(f"engine {args.engine}; OTLP sink: {sink.requests} export requests, "
              f"{sink.bytes / 1e6:.1f} MB")
    finally:
        for proc in procs:
            pb.stop(proc)
        sink.server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
