"""Which service a call is for: Host, absolute-form target, or `/NAME/` path prefix.

The table is built once per plan (on load and on every reload) so the per-request work is
two dict lookups. The rule, from the contract (section 9), in order:

1. a forward-proxy request (absolute-form target, the app uses `HTTP_PROXY`) goes to the
   service whose name or `host` alias is the target's host; any other host gets 403;
2. otherwise the `Host` header (port ignored, case-insensitive) picks the service;
3. otherwise a path `/NAME/rest` goes to service NAME, forwarded as `/rest`;
4. otherwise 404.

Nothing is ever forwarded to a host the plan does not name. `CONNECT` (a tunnel request)
is never honoured: riprap cannot apply policies inside a TLS tunnel, so it answers 403 for
an unknown host and 405 for a known one (use `http://` through the proxy instead).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping, NamedTuple

from dsl.plan import Plan
from policies.hosts import HostTable, host_key

# Key set by the sidecar's uvicorn protocol for absolute-form request targets.
ABSOLUTE_TARGET_KEY = "riprap.absolute_target"


class Route(NamedTuple):
    """A routed call: the service and the raw path (+query) to send upstream.

    A named tuple rather than a frozen dataclass: one is made per call, and a frozen
    dataclass's `__init__` (`object.__setattr__` per field) costs several times more.
    """

    service: str
    raw_path: bytes  # percent-encoded path as it goes upstream (prefix removed)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A call riprap will not forward: the status, reason header and JSON body to answer."""

    status: int
    reason: str
    body: bytes




class Router:
    """The routing table of one plan. Immutable; rebuilt and swapped on reload."""

    def __init__(self, plan: Plan) -> None:
        # the engine's own table (`policies.hosts`): one rule for which service a host names
        self.service_for_host = HostTable(
            {name: svc.hosts for name, svc in plan.services.items()}).service_for_host
        self._by_name: Mapping[str, str] = {n: n for n in plan.services}
        self.services: tuple[str, ...] = tuple(sorted(plan.services))

    def refusal(self, status: int, name: str) -> Refusal:
        body = json.dumps({"error": f"unknown service '{name}'", "reason": "unknown-service",
                           "services": list(self.services)}).encode()
        return Refusal(status, "unknown-service", body)

    def route(self, method: str, host: str | None, raw_path: bytes,
              absolute_host: str | None) -> Route | Refusal:
        """Decide where one call goes. `absolute_host` is set for forward-proxy requests."""
        if method == "CONNECT":
            target = absolute_host or host or ""
            if self.service_for_host(target) is None:
                return self.refusal(403, host_key(target))
            body = json.dumps({
                "error": "CONNECT tunnels are not supported: send plain http:// requests "
                         "through the proxy so that policies apply",
                "reason": "connect-unsupported", "services": list(self.services)}).encode()
            return Refusal(405, "connect-unsupported", body)
        if absolute_host is not None:
            name = self.service_for_host(absolute_host)
            if name is None:
                return self.refusal(403, host_key(absolute_host))
            return Route(name, raw_path)
        if host:
            name = self.service_for_host(host)
            if name is not None:
                return Route(name, raw_path)
        # `/NAME/rest` -> NAME, forwarded as `/rest` (`/NAME` alone -> `/`).
        if raw_path.startswith(b"/"):
            end = raw_path.find(b"/", 1)
            q = raw_path.find(b"?", 1)
            if end < 0 or (0 <= q < end):
                end = q if q >= 0 else len(raw_path)
            first = raw_path[1:end].decode("latin-1")
            name = self._by_name.get(first)
            if name is not None:
                rest = raw_path[end:]
                if not rest.startswith(b"/"):
                    rest = b"/" + rest
                return Route(name, rest)
            bare = host_key(host) if host else ""
            return self.refusal(404, first if (first and _is_local(bare)) else (bare or first))
        return self.refusal(404, host_key(host) if host else "")


def _is_local(host: str) -> bool:
    """An address of the sidecar itself rather than a service name."""
    return host in ("", "localhost") or host.replace(".", "").isdigit() or ":" in host
