"""Engines: what enforces a compiled plan.

`python` is riprap's own sidecar (ASGI proxy + `ResilientTransport`); `envoy` compiles the
plan to Envoy configuration (`sidecar.engines.envoy.config`) and runs Envoy as the data
plane. Both read only the validated `dsl.plan.Plan`, never the AST.
"""

from __future__ import annotations

ENGINES: tuple[str, ...] = ("python", "envoy")
DEFAULT_ENGINE = "python"

__all__ = ["DEFAULT_ENGINE", "ENGINES"]
