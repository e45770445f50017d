"""Putting an Envoy configuration in force: validate it whole, then swap files atomically.

Envoy reads its listeners, routes and clusters from files in a watched directory
(file-based xDS: `path_config_source` + `watched_directory`), and applies a file when it is
*moved* into that directory. So a reload is: write each changed file next to the live one,
`os.replace` it over the live one (atomic: Envoy never reads half a file), and wait until
Envoy reports the file's version as in force.

Why the checks around that:

* `envoy --mode validate` does not read file-based dynamic resources, so validation runs
  on a bootstrap with the same listeners, routes and clusters inlined as static resources:
  everything Envoy would refuse at runtime (bad fields, a route to an unknown cluster) is
  refused there, with Envoy's own message, before a byte of the live directory changes.
* Every file carries `version_info` = a digest of its content, and Envoy's text readouts
  (`cluster_manager.cds.version_text`, `listener_manager.lds.version_text`,
  `http.*.rds.NAME.version_text`) say which version runs; `update_rejected` says Envoy
  refused one. A refused file is put back as it was, so the old configuration keeps
  serving, and the reload fails with Envoy's reason.
* Order: clusters first (with the clusters that are going away still present), then
  routes, then listeners, then clusters again without the removed ones: a route never
  names a cluster Envoy does not have, so no call fails during the swap. Envoy keeps a
  cluster whose definition did not change as it is (hosts, health, outlier state), which
  is how the state of unchanged services carries over.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sidecar.metrics import LATENCY_BUCKETS
from sidecar.engines.envoy.process import EnvoyError, EnvoyProcess, EnvoyRejected, validate

log = logging.getLogger("riprap.envoy.reload")

T_CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
T_LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
T_ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
T_EXTENSION = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
APPLY_TIMEOUT = 5.0  # seconds for Envoy to report a swapped file in force


class ConfigLike(Protocol):
    """What `config.build_config` returns (`EnvoyConfig`): a bootstrap and resource files."""

    @property
    def bootstrap(self) -> dict[str, Any]: ...

    @property
    def resources(self) -> dict[str, dict[str, Any]]: ...


def kind_of(doc: dict[str, Any]) -> str:
    """`cluster`, `route`, `listener` or `other`: what a resource file holds."""
    types = {r.get("@type") for r in doc.get("resources", ())}
    if types == {T_CLUSTER}:
        return "cluster"
    if types == {T_ROUTE}:
        return "route"
    if types == {T_LISTENER}:
        return "listener"
    if types == {T_EXTENSION}:
        return "extension"
    return "other"


def versioned(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with `version_info` set to a digest of its resources."""
    body = json.dumps(doc.get("resources", []), sort_keys=True, separators=(",", ":"))
    out = dict(doc)
    out["version_info"] = hashlib.sha256(body.encode()).hexdigest()[:16]
    return out


def _strip_type(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "@type"}


def _hcms(listener: dict[str, Any]) -> list[dict[str, Any]]:
    """The HTTP connection managers of a listener (their typed_config)."""
    out = []
    chains = list(listener.get("filter_chains", ()))
    if listener.get("default_filter_chain"):
        chains.append(listener["default_filter_chain"])
    for chain in chains:
        for f in chain.get("filters", ()):
            tc = f.get("typed_config", {})
            if tc.get("@type") == HCM:
                out.append(tc)
    return out


def validation_bootstrap(bootstrap: dict[str, Any],
                         resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The bootstrap with every file-based listener, route and cluster inlined as static.

    `--mode validate` checks static resources in full (and does not read file-based
    ones), so this is the configuration Envoy would run, checked the way Envoy checks it.
    """
    clusters: list[dict[str, Any]] = []
    listeners: list[dict[str, Any]] = []
    routes: dict[str, dict[str, Any]] = {}
    for doc in resources.values():
        for r in doc.get("resources", ()):
            t = r.get("@type")
            if t == T_CLUSTER:
                clusters.append(_strip_type(r))
            elif t == T_LISTENER:
                listeners.append(copy.deepcopy(_strip_type(r)))
            elif t == T_ROUTE:
                routes[r.get("name", "")] = _strip_type(r)
    from sidecar.engines.envoy.config import inline_discovered_filters

    extensions = {r.get("name", ""): r.get("typed_config", {})
                  for doc in resources.values() for r in doc.get("resources", ())
                  if r.get("@type") == T_EXTENSION}
    for listener in listeners:
        for hcm in _hcms(listener):
            inline_discovered_filters(hcm, extensions)
            rds = hcm.pop("rds", None)
            if rds is not None:
                name = rds.get("route_config_name", "")
                if name not in routes:
                    raise EnvoyRejected(f"listener {listener.get('name')!r} names route "
                                        f"configuration {name!r}, which no file holds")
                hcm["route_config"] = routes[name]
    out = copy.deepcopy(bootstrap)
    out.pop("dynamic_resources", None)
    static = out.setdefault("static_resources", {})
    static["clusters"] = [*static.get("clusters", []), *clusters]
    static["listeners"] = [*static.get("listeners", []), *listeners]
    return out


def _write_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, separators=(",", ":"))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _route_stat_names(resources: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """route configuration name -> the `http.PREFIX.rds.NAME` stat prefixes naming it."""
    out: dict[str, list[str]] = {}
    for doc in resources.values():
        for r in doc.get("resources", ()):
            if r.get("@type") != T_LISTENER:
                continue
            for hcm in _hcms(r):
                rds = hcm.get("rds")
                if rds is not None:
                    name = rds.get("route_config_name", "")
                    out.setdefault(name, []).append(f"http.{hcm.get('stat_prefix', '')}.rds.{name}")
    return out


class ConfigSwapper:
    """The live resource files of one Envoy, and how a new set replaces them."""

    def __init__(self, binary: str, run_dir: Path, dynamic_dir: Path) -> None:
        self.binary = binary
        self.run_dir = run_dir
        self.dynamic_dir = dynamic_dir
        self.current: dict[str, dict[str, Any]] = {}  # file name -> versioned doc in force
        self.process: EnvoyProcess | None = None
        self._n = 0

    # -- validation -------------------------------------------------------------------
    async def validate(self, config: ConfigLike) -> None:
        """Envoy's verdict on the whole configuration; raises EnvoyRejected."""
        doc = validation_bootstrap(config.bootstrap, config.resources)
        self._n += 1
        path = self.run_dir / f"validate-{os.getpid()}-{self._n}.json"
        path.write_text(json.dumps(doc), encoding="utf-8")
        try:
            await validate(self.binary, path)
        finally:
            path.unlink(missing_ok=True)

    # -- first write (before Envoy starts) ----------------------------------------------
    def write_initial(self, config: ConfigLike) -> Path:
        """Write the resource files and the bootstrap; the bootstrap's path."""
        self.dynamic_dir.mkdir(parents=True, exist_ok=True)
        for name, doc in config.resources.items():
            v = versioned(doc)
            _write_atomic(self.dynamic_dir / name, v)
            self.current[name] = v
        boot = self.run_dir / "envoy.json"
        _write_atomic(boot, config.bootstrap)
        return boot

    # -- hot swap -----------------------------------------------------------------------
    async def swap(self, config: ConfigLike) -> bool:
        """Put `config`'s resources in force. False when nothing changed.

        Raises EnvoyRejected (Envoy's reason) when Envoy refuses a file; the files are
        then as they were and the old configuration keeps serving.
        """
        new = {name: versioned(doc) for name, doc in config.resources.items()}
        changed = [n for n in new if self.current.get(n) != new[n]]
        if not changed:
            return False
        old = dict(self.current)
        steps: list[tuple[str, dict[str, Any]]] = []
        kinds = {n: kind_of(new[n]) for n in changed}
        # 1. clusters, keeping the ones about to go away; 2. filter configurations (limits);
        # 3. routes; 4. listeners and the rest
        final_clusters: list[tuple[str, dict[str, Any]]] = []
        for n in changed:
            if kinds[n] != "cluster":
                continue
            names = {r.get("name") for r in new[n]["resources"]}
            going = [r for r in old.get(n, {}).get("resources", ()) if r.get("name") not in names]
            if going:
                union = dict(new[n])
                union["resources"] = [*new[n]["resources"], *going]
                steps.append((n, versioned(union)))
                final_clusters.append((n, new[n]))
            else:
                steps.append((n, new[n]))
        # the filters' own configuration (limits) before the routes that use it
        steps += [(n, new[n]) for n in changed if kinds[n] == "extension"]
        steps += [(n, new[n]) for n in changed if kinds[n] == "route"]
        steps += [(n, new[n]) for n in changed if kinds[n] not in ("cluster", "route", "extension")]
        steps += final_clusters
        route_stats = _route_stat_names(new)
        done: list[str] = []
        try:
            for name, doc in steps:
                await self._put(name, doc, route_stats)
                done.append(name)
        except EnvoyRejected:
            await self._restore(old, done, _route_stat_names(old))
            raise
        return True

    async def _put(self, name: str, doc: dict[str, Any],
                   route_stats: dict[str, list[str]]) -> None:
        proc = self.process
        watch = self._watch_stats(doc, route_stats, name)
        before = await self._read(watch) if proc is not None and proc.ready and watch else None
        _write_atomic(self.dynamic_dir / name, doc)
        self.current[name] = doc
        if before is None:
            return  # Envoy is down (or restarting): it reads the files when it starts
        await self._await_version(name, doc["version_info"], watch, before)

    def _watch_stats(self, doc: dict[str, Any], route_stats: dict[str, list[str]],
                     name: str = "") -> list[str]:
        kind = kind_of(doc)
        if kind == "cluster":
            return ["cluster_manager.cds"]
        if kind == "listener":
            return ["listener_manager.lds"]
        if kind == "extension":  # an HTTP filter's configuration (extension config discovery)
            where = "upstream_http_filter" if "upstream" in name else "http_filter"  # the router's
            return [f"extension_config_discovery.{where}.{r.get('name', '')}" for r in doc["resources"]]
        if kind == "route":
            out = []
            for r in doc["resources"]:
                out += route_stats.get(r.get("name", ""), [])
            return out
        return []

    async def _read(self, prefixes: list[str]) -> dict[str, str]:
        assert self.process is not None
        pattern = "^(" + "|".join(p.replace(".", r"\.") for p in prefixes) + r")\.(version_text|update_rejected|update_failure)$"
        return await self.process.stats(pattern)

    async def _await_version(self, name: str, version: str, prefixes: list[str],
                             before: dict[str, str]) -> None:
        assert self.process is not None
        deadline = time.monotonic() + APPLY_TIMEOUT
        while True:
            try:
                now = await self._read(prefixes)
            except (EnvoyError, OSError) as exc:
                log.warning("envoy admin unreachable while applying %s: %s", name, exc)
                return  # Envoy died: the supervisor restarts it on the new files
            if all(now.get(f"{p}.version_text", "").strip('"') == version for p in prefixes):
                return
            for p in prefixes:
                for counter in ("update_rejected", "update_failure"):
                    key = f"{p}.{counter}"
                    if int(now.get(key, "0") or 0) > int(before.get(key, "0") or 0):
                        raise EnvoyRejected(f"Envoy refused {name}: "
                                            f"{self.process.rejection_reason()}")
            if time.monotonic() >= deadline:
                raise EnvoyRejected(f"Envoy did not apply {name} within {APPLY_TIMEOUT:.0f} s: "
                                    f"{self.process.rejection_reason()}")
            await asyncio.sleep(0.01)

    async def _restore(self, old: dict[str, dict[str, Any]], done: list[str],
                       route_stats: dict[str, list[str]]) -> None:
        """Put back the files of `done` as they were in `old` (reverse order)."""
        for name in reversed(dict.fromkeys(done)):
            doc = old.get(name)
            try:
                if doc is None:
                    (self.dynamic_dir / name).unlink(missing_ok=True)
                    self.current.pop(name, None)
                else:
                    await self._put(name, doc, route_stats)
            except EnvoyRejected as exc:  # pragma: no cover - the old file ran before
                log.error("could not restore %s: %s", name, exc)
        # The refused file itself was written too: put it back.
        for name, doc in old.items():
            if self.current.get(name) != doc:
                _write_atomic(self.dynamic_dir / name, doc)
                self.current[name] = doc


ROUTES_FILE = "rds.json"
LUA_METADATA = "envoy.filters.http.lua"


def stat_name(service: str) -> str:
    """A service's route stat prefix: Envoy's stat names split tags on dots."""
    return "riprap_" + re.sub(r"[^A-Za-z0-9_-]", "_", service)


def _name_route_stats(table: dict[str, Any]) -> None:
    """Give each route a `stat_prefix` naming its service (Envoy then counts per route)."""
    for vhost in table.get("virtual_hosts", ()):
        for route in vhost.get("routes", ()):
            service = route_service(vhost, route)
            if service is not None and "stat_prefix" not in route:
                route["stat_prefix"] = stat_name(service)


def route_service(vhost: dict[str, Any], route: dict[str, Any]) -> str | None:
    """The service a route serves: the compiler's route metadata, else its virtual host."""
    meta = route.get("metadata", {}).get("filter_metadata", {}).get(LUA_METADATA, {})
    if isinstance(meta, dict) and isinstance(meta.get("service"), str):
        return str(meta["service"])
    name = str(vhost.get("name", ""))
    if name.startswith("service:"):
        return name[len("service:"):]
    return None


@dataclass(frozen=True)
class RunConfig:
    """A configuration as the engine runs it (see `split_routes`)."""

    bootstrap: dict[str, Any]
    resources: dict[str, dict[str, Any]]
    notes: tuple[Any, ...] = ()


def split_routes(config: ConfigLike, dynamic_dir: Path) -> RunConfig:
    """Move the listeners' inline route tables into their own file (file-based RDS).

    Why: a listener whose definition changes is drained and replaced by Envoy, closing
    its keep-alive connections; a route table that changes is swapped in place with no
    connection touched. Most reloads change routes and clusters only, so with the routes
    in `rds.json` they never disturb a connection. The configuration is otherwise exactly
    the compiler's (`compile --target envoy` keeps its routes inline, simpler to read),
    but for `stats_flush_on_admin` (histograms merged when `/metrics` asks) and a
    `stat_prefix` on each route naming its service (Envoy then counts calls per service:
    `riprap_calls_total` and `riprap_call_duration_seconds` are read from those).
    """
    resources = copy.deepcopy(config.resources)
    routes: list[dict[str, Any]] = []
    path = dynamic_dir / ROUTES_FILE
    for doc in resources.values():
        for r in doc.get("resources", ()):
            if r.get("@type") != T_LISTENER:
                continue
            for hcm in _hcms(r):
                table = hcm.pop("route_config", None)
                if table is None:
                    continue
                name = table.setdefault("name", f"routes-{len(routes)}")
                routes.append({"@type": T_ROUTE, **table})
                hcm["rds"] = {"route_config_name": name, "config_source": {
                    "resource_api_version": "V3",
                    "path_config_source": {"path": str(path),
                                           "watched_directory": {"path": str(dynamic_dir)}}}}
    for doc in resources.values():
        for r in doc.get("resources", ()):
            if r.get("@type") == T_ROUTE:
                _name_route_stats(r)
    for table in routes:
        _name_route_stats(table)
    if routes:
        if ROUTES_FILE in resources:
            raise EnvoyRejected(f"the configuration already has a file named {ROUTES_FILE}")
        resources[ROUTES_FILE] = {"resources": routes}
    bootstrap = dict(config.bootstrap)
    if "stats_sinks" not in bootstrap and "stats_flush_interval" not in bootstrap:
        # No sinks: merge the workers' histograms when riprap asks, not every 5 s.
        bootstrap.setdefault("stats_flush_on_admin", True)
    if "stats_config" not in bootstrap:
        # The Python engine's latency buckets (ms), so both engines' histograms line up.
        bootstrap["stats_config"] = {"histogram_bucket_settings": [{
            "match": {"safe_regex": {"regex": ".*"}}, "buckets": [b * 1000 for b in LATENCY_BUCKETS]}]}
    return RunConfig(bootstrap, resources, tuple(getattr(config, "notes", ())))
