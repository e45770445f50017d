"""`riprap compile FILE --target envoy -o DIR`: the configuration for people who run Envoy.

DIR gets envoy.yaml (with a comment saying how to run it) and the files it names. The
listener is the plan's `listen`; Envoy's own admin API takes the port of the plan's
`admin` on 127.0.0.1 (riprap's admin endpoints are not there: nothing of riprap runs).
Shared limits need riprap's rate limit service, so here they are this Envoy's own.
Tracing is compiled in when the standard OTEL_* variables are set at compile time.
"""

from __future__ import annotations

import os
from pathlib import Path

from dsl.plan import Plan
from sidecar.engines.envoy.config import EngineNote, EnvoyPorts, build_config, write_config


def split_address(addr: str) -> tuple[str, int]:
    """`127.0.0.1:7400` -> ("127.0.0.1", 7400); `[::1]:7400` -> ("::1", 7400)."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def compile_to_dir(plan: Plan, out_dir: Path, *, chaos: bool = False) -> tuple[list[Path], tuple[EngineNote, ...]]:
    """Write the Envoy configuration of `plan` into `out_dir`; returns the files and the notes."""
    host, port = split_address(plan.listen)
    _, admin_port = split_address(plan.admin)
    out = out_dir.absolute()
    # the OTEL_* variables of this environment: a folder compiled with them traces as `run` does
    config = build_config(plan, EnvoyPorts(host, port, admin_port), dynamic_dir=out, chaos=chaos,
                          environ=dict(os.environ))
    return write_config(config, out), config.notes


__all__ = ["compile_to_dir", "split_address"]
