"""Section 9, faithful forwarding, on both engines: the upstream gets the headers as sent.

Envoy's router adds headers of its own to each attempt (`x-envoy-expected-rq-timeout-ms`,
and `x-envoy-original-path` when the route strips a prefix); the Envoy engine drops them
(listeners.py ENVOY_ADDED) while still sending riprap's `x-riprap-deadline-ms`. A real
upstream on loopback records what arrives, one call per engine. What Envoy still adds is
listed in ENVOY_STILL_ADDS (docs/engines.md says why).
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from tests.acceptance.acc_kit import Sidecar, Upstream, free_port

pytestmark = pytest.mark.timeout(120)

# added after the upstream filters by auto_host_rewrite; and the HCM's x-forwarded-proto
ENVOY_STILL_ADDS = {"x-envoy-original-host", "x-forwarded-proto"}


def policy(a: str) -> str:
    return f"""\
app forwarded

service plain {{
    host plain.internal
    timeout 2s
    endpoint {a}
}}

service resending {{
    endpoint {a}
    retry 2 on 503 backoff 1ms
}}
"""


@pytest.fixture(scope="module")
def ups() -> Iterator[Upstream]:
    a = Upstream("A")
    yield a
    a.close()


@pytest.fixture(scope="module", params=("python", "envoy"))
def sc(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
       ups: Upstream) -> Iterator[Sidecar]:
    d = tmp_path_factory.mktemp(f"forwarded_{request.param}")
    path = d / "forwarded.riprap"
    path.write_text(policy(ups.url), encoding="utf-8")
    port, admin = free_port(), free_port()
    side = Sidecar(path, port, admin, "--listen", f"127.0.0.1:{port}", "--admin",
                   f"127.0.0.1:{admin}", "--engine", str(request.param)).start(timeout=30)
    side.engine = str(request.param)  # type: ignore[attr-defined]
    try:
        yield side
    finally:
        side.stop()


def arrived(sc: Sidecar, ups: Upstream, prefix: str, **kw: Any) -> dict[str, str]:
    i = f"{time.monotonic_ns()}"
    r = sc.get(f"{prefix}/hdrs/{i}", headers={"X-Client-Thing": "kept"}, **kw)
    assert r.status_code == 200, r.text
    hits = ups.hits(f"/hdrs/{i}")
    assert len(hits) == 1, hits
    got = dict(hits[0]["headers"])
    if getattr(sc, "engine", "") == "envoy":
        for name in ENVOY_STILL_ADDS:
            got.pop(name, None)
    else:
        assert "x-forwarded-proto" not in got, got
    return got


@pytest.mark.parametrize("prefix", ["/plain", "/resending"])
def test_no_envoy_header_reaches_the_upstream_when_a_prefix_is_stripped(
        sc: Sidecar, ups: Upstream, prefix: str) -> None:
    got = arrived(sc, ups, prefix)
    assert got["x-client-thing"] == "kept"
    assert not [k for k in got if k.startswith("x-envoy-")], got
    # riprap's own deadline still goes with the call (section 9), on both engines
    assert 0 < int(got["x-riprap-deadline-ms"]) <= 30000, got


def test_no_envoy_header_reaches_the_upstream_when_routed_by_host(sc: Sidecar, ups: Upstream) -> None:
    got = arrived(sc, ups, "", host="plain.internal")
    assert not [k for k in got if k.startswith("x-envoy-")], got
    assert 0 < int(got["x-riprap-deadline-ms"]) <= 2000, got
