"""The Envoy engine: the plan compiled to Envoy configuration, Envoy as the data plane.

`config` builds the bootstrap and the file-based dynamic resources (listeners and
clusters in a watched directory, so a reload is an atomic file swap). The running side
(process supervision, reload, admin translation) lives in the sibling modules.
"""

from __future__ import annotations

from sidecar.engines.envoy.config import (
    EngineNote,
    EnvoyConfig,
    EnvoyPorts,
    build_config,
    cluster_name,
    write_config,
)

__all__ = ["EngineNote", "EnvoyConfig", "EnvoyPorts", "build_config", "cluster_name", "write_config"]
