"""`EndpointRuntime`: an endpoint's live state plus how to address it (URL prefix, Host);
`EndpointPool`: a shard's endpoints, replaceable while calls are in flight.

An endpoint found by DNS (a `resolve` line, `policies.discovery`) is addressed by its IP
(`address`) while `Host` stays the URL's name (and TLS SNI: its `TlsClient` is built with
the name): the request goes to `scheme://ADDRESS:PORT/path` with `Host: name:port`."""

from __future__ import annotations

from typing import Callable, Sequence

import httpx

from dsl.plan import EndpointSpec
from policies.health import EndpointState
from policies.httpx_compat import exact_url
from policies.tls import TLS_EXTENSION, TlsClient


class EndpointRuntime:
    """An endpoint's live state plus what is needed to address it (URL prefix, Host)."""

    __slots__ = ("spec", "state", "prefix", "authority", "_urls", "release", "extensions",
                 "_scheme", "_host", "_port", "_base", "address")

    def __init__(self, spec: EndpointSpec, state: EndpointState,
                 tls: TlsClient | None = None, address: str | None = None) -> None:
        self.spec = spec
        self.state = state
        self.address = address  # the IP a resolved line's name answered (None: as written)
        # what each attempt's request carries for the inner transport (how TLS is done)
        self.extensions: dict[str, object] = {TLS_EXTENSION: tls} if tls is not None else {}
        url = httpx.URL(spec.url)
        port = f":{url.port}" if url.port is not None else ""
        host = url.raw_host.decode("ascii")
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        self.authority = f"{host}{port}".encode("ascii")
        target = host
        if address is not None:
            target = f"[{address}]" if ":" in address else address
        base = url.raw_path.decode("ascii").split("?", 1)[0].rstrip("/")
        self.prefix = f"{url.scheme}://{target}{port}{base}"
        # the request goes to the address (a resolved line's), `Host` stays the name
        self._scheme, self._port = url.scheme, url.port
        self._host = address if address is not None else url.host
        self._base = base.encode("ascii")
        self._urls: dict[bytes, httpx.URL] = {}
        # lowers the in-flight count once an answer is closed (built once, not per attempt)
        self.release = release_in_flight(state)

    def url_for(self, raw_path: bytes) -> httpx.URL:
        """The upstream URL for a request path+query: the endpoint's own path prefix, then
        the target exactly as the client sent it (never normalised; `*` stays `*`).
        Built once per distinct path."""
        url = self._urls.get(raw_path)
        if url is None:
            if raw_path == b"*":
                target = raw_path
            else:
                target = self._base + (raw_path if raw_path.startswith(b"/") else b"/" + raw_path)
            url = exact_url(self._scheme, self._host, self._port, target)
            if len(self._urls) >= 512:
                self._urls.clear()
            self._urls[raw_path] = url
        return url


def release_in_flight(state: EndpointState) -> Callable[[], None]:
    """A callback that lowers the endpoint's in-flight count once its answer is closed."""
    def done() -> None:
        if state.in_flight > 0:
            state.in_flight -= 1
    return done


class PoolView:
    """One immutable view of a shard's endpoints: the list, their states (for tier and
    balancer choices), and the endpoint of each state."""

    __slots__ = ("endpoints", "states", "by_state")

    def __init__(self, endpoints: Sequence[EndpointRuntime]) -> None:
        self.endpoints: tuple[EndpointRuntime, ...] = tuple(endpoints)
        self.states: list[EndpointState] = [e.state for e in self.endpoints]
        self.by_state: dict[int, EndpointRuntime] = {id(e.state): e for e in self.endpoints}


class EndpointPool:
    """A shard's endpoints. `replace` swaps in a new list at once (one reference): an
    attempt reads `view` once and works on that view to its end, so a list replaced
    while calls are in flight (a DNS re-lookup) never mixes two lists in one attempt.
    An endpoint kept across a replacement should be the same `EndpointRuntime` (its
    health, ejection and in-flight count live in its state)."""

    __slots__ = ("view",)

    def __init__(self, endpoints: Sequence[EndpointRuntime] = ()) -> None:
        self.view = PoolView(endpoints)

    def replace(self, endpoints: Sequence[EndpointRuntime]) -> None:
        self.view = PoolView(endpoints)

    @property
    def endpoints(self) -> tuple[EndpointRuntime, ...]:
        return self.view.endpoints


__all__ = ["EndpointPool", "EndpointRuntime", "PoolView", "release_in_flight"]
