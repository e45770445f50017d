"""`EndpointRuntime`: an endpoint's live state plus how to address it (URL prefix, Host)."""

from __future__ import annotations

from typing import Callable

import httpx

from dsl.plan import EndpointSpec
from policies.health import EndpointState
from policies.tls import TLS_EXTENSION, TlsClient


class EndpointRuntime:
    """An endpoint's live state plus what is needed to address it (URL prefix, Host)."""

    __slots__ = ("spec", "state", "prefix", "authority", "_urls", "release", "extensions")

    def __init__(self, spec: EndpointSpec, state: EndpointState,
                 tls: TlsClient | None = None) -> None:
        self.spec = spec
        self.state = state
        # what each attempt's request carries for the inner transport (how TLS is done)
        self.extensions: dict[str, object] = {TLS_EXTENSION: tls} if tls is not None else {}
        url = httpx.URL(spec.url)
        port = f":{url.port}" if url.port is not None else ""
        host = url.raw_host.decode("ascii")
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        self.authority = f"{host}{port}".encode("ascii")
        base = url.raw_path.decode("ascii").split("?", 1)[0].rstrip("/")
        self.prefix = f"{url.scheme}://{host}{port}{base}"
        self._urls: dict[bytes, httpx.URL] = {}
        # lowers the in-flight count once an answer is closed (built once, not per attempt)
        self.release = release_in_flight(state)

    def url_for(self, raw_path: bytes) -> httpx.URL:
        """The upstream URL for a request path+query (parsed once per distinct path)."""
        url = self._urls.get(raw_path)
        if url is None:
            path = raw_path.decode("ascii")
            if not path.startswith("/"):
                path = "/" + path
            url = httpx.URL(self.prefix + path)
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


__all__ = ["EndpointRuntime", "release_in_flight"]
