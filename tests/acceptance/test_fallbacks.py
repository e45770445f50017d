"""Acceptance: fallbacks.

A real `riprap run` on loopback with this file's own small policy, next to its tests
(written from /work/shared/language.md; each test cites its contract section). The
sidecar comes from the `run_sidecar` fixture (conftest.py), the upstreams from `ups`."""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from acc_kit import (
    RunSidecar,
    attempts,
    flipset_path,
    reason,
    sidecar_env,
    uid,
    wait_for,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
]

# the services of this file's policy (the admin listener names each one)
SERVICES = ['echo', 'dead', 'slow', 'fbstatic', 'fb5xx', 'stalesvc', 'fbsvc', 'chain', 'sickfb', 'timeoutfb', 'staleshort', 'fbchain2', 'retry4xx', 'fbfile']
FALLBACK_FILE = '{"from": "file", "items": []}\n'



def policy(A: str, B: str, C: str, DEAD: str, listen: int, admin: int) -> str:
    return f"""\
app acc
listen 127.0.0.1:{listen}
admin 127.0.0.1:{admin}

service echo {{
    host echo.internal, alias.example
    endpoint {A}
}}

service dead {{
    endpoint {DEAD}
}}

service slow {{
    timeout 300ms
    endpoint {A}
}}

service fbstatic {{
    fallback status 200 json {{"from": "fallback",
                             "ok": true}}
    endpoint {DEAD}
}}

service fb5xx {{
    retry 1 on 5xx backoff 1ms
    fallback status 200 text "static-fallback"
    endpoint {A}
}}

service stalesvc {{
    fallback stale 5m
    endpoint {A}
}}

service fbsvc {{
    fallback service echo
    endpoint {DEAD}
}}

service chain {{
    fallback stale 5m
    fallback status 200 text "chain-static"
    endpoint {DEAD}
}}

service sickfb {{
    health GET /s/503/health every 100ms timeout 500ms fall 1 rise 1
    fallback stale 5m
    endpoint {A}
}}

service timeoutfb {{
    timeout 300ms
    fallback status 200 text "slow-fallback"
    endpoint {A}
}}

service staleshort {{
    fallback stale 300ms
    endpoint {A}
}}

service fbchain2 {{
    endpoint {DEAD}
    fallback service dead
    fallback status 200 text "second-fallback"
}}

service retry4xx {{
    retry 1 on 429 backoff 1ms
    fallback status 200 text "4xx-fallback"
    endpoint {A}
}}

service fbfile {{
    fallback status 503 file "fallbacks/fbfile.json"
    endpoint {DEAD}
}}

"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, ups: dict[str, Any],
        run_sidecar: RunSidecar) -> Iterator[dict[str, Any]]:
    yield from sidecar_env(policy, tmp_path_factory, ups, run_sidecar,
                           files={"fallbacks/fbfile.json": FALLBACK_FILE})


def test_static_json_fallback(env: dict[str, Any]) -> None:
    r = env["sc"].get(f"/fbstatic/x/{uid()}")
    assert r.status_code == 200
    assert r.headers.get("x-riprap-fallback") == "static"
    assert r.json() == {"from": "fallback", "ok": True}
    assert "x-riprap-reason" in r.headers  # section 9: riprap made this answer
    assert "json" in r.headers.get("content-type", "")


def test_static_fallback_after_5xx_but_never_for_4xx(env: dict[str, Any]) -> None:
    # contract §4: "A fallback answers ... a 5xx answer after retries. It never replaces an upstream 4xx."
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/fb5xx/s/500/{i}")
    assert r.status_code == 200 and r.text == "static-fallback"
    assert r.headers.get("x-riprap-fallback") == "static"
    assert len(A.hits(i)) == 2  # retried first, then the fallback
    for code in (404, 429, 400):
        r = sc.get(f"/fb5xx/s/{code}/{uid()}")
        assert r.status_code == code and r.text == f"A says {code}"
        assert "x-riprap-fallback" not in r.headers
        assert attempts(r) == 1


def test_stale_fallback(env: dict[str, Any]) -> None:
    # contract §4 fallback stale D: "the last good response to the same method and URL"; §9 x-riprap-fallback: stale
    sc = env["sc"]
    path = f"/stalesvc/flip/{uid()}"
    first = sc.get(path)
    assert first.status_code == 200 and "x-riprap-fallback" not in first.headers
    again = sc.get(path)
    assert again.status_code == 200
    assert again.headers.get("x-riprap-fallback") == "stale"
    assert again.json() == first.json()
    other = sc.get(f"/stalesvc/flip/{uid()}x")  # another URL has no stale copy
    assert other.headers.get("x-riprap-fallback") != "stale"


def test_service_fallback(env: dict[str, Any]) -> None:
    # contract §4 fallback service NAME; §9 x-riprap-fallback: service
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/fbsvc/via/{i}")
    assert r.status_code == 200
    assert r.headers.get("x-riprap-fallback") == "service"
    assert r.headers["x-upstream"] == "A" and len(A.hits(i)) == 1


def test_timeout_goes_to_fallback(env: dict[str, Any]) -> None:
    # contract §4: "A fallback answers a call that failed: ... timed out"
    t = time.monotonic()
    r = env["sc"].get(f"/timeoutfb/sleep/2/{uid()}")
    assert r.status_code == 200 and r.text == "slow-fallback"
    assert r.headers.get("x-riprap-fallback") == "static"
    assert time.monotonic() - t < 1.0


def test_fallback_chain_in_order(env: dict[str, Any]) -> None:
    """Section 4: several fallback lines are tried in order (stale, then static)."""
    r = env["sc"].get(f"/chain/x/{uid()}")
    assert r.status_code == 200 and r.text == "chain-static"
    assert r.headers.get("x-riprap-fallback") == "static"
    attempts(r)  # section 9: every proxied answer carries x-riprap-attempts


def test_no_healthy_endpoint_with_stale_fallback_and_no_copy(env: dict[str, Any]) -> None:
    # contract §9: "no-healthy-endpoint (503)" when the fallback chain has nothing
    sc, A = env["sc"], env["A"]
    i = uid()
    r = wait_for(lambda: (lambda r: r if reason(r) == "no-healthy-endpoint" else None)(
        sc.get(f"/sickfb/x/{uid()}")), 3)
    assert r is not None and r.status_code == 503
    sc.get(f"/sickfb/x/{i}")
    assert A.hits(i) == []


def test_stale_copy_is_per_method(env: dict[str, Any]) -> None:
    # contract §4 fallback stale: "to the same method and URL"
    sc = env["sc"]
    path = f"/stalesvc/flip/{uid()}"
    assert sc.get(path).status_code == 200
    r = sc.get(path, method="DELETE")
    assert r.status_code == 503 and r.headers.get("x-riprap-fallback") != "stale"


def test_stale_copy_expires(env: dict[str, Any]) -> None:
    """Section 4: fallback stale D: only a last good response younger than D."""
    sc = env["sc"]
    path = f"/staleshort/flip/{uid()}"
    assert sc.get(path).status_code == 200
    time.sleep(0.4)
    r = sc.get(path)
    assert r.status_code == 503 and r.headers.get("x-riprap-fallback") is None


def test_service_fallback_gets_the_request_body(env: dict[str, Any]) -> None:
    # contract §4 fallback service NAME: "send the failed call to another declared service"
    sc = env["sc"]
    i = uid()
    r = sc.get(f"/fbsvc/post/{i}", method="POST", content=b"the-body",
               headers={"X-Custom": "kept"})
    assert r.status_code == 200 and r.headers.get("x-riprap-fallback") == "service"
    doc = r.json()
    assert doc["method"] == "POST" and doc["body"] == "the-body"
    assert doc["path"] == f"/post/{i}" and doc["headers"].get("x-custom") == "kept"


def test_fallback_chain_after_failed_service_fallback(env: dict[str, Any]) -> None:
    # contract §4: "Several fallback lines form a chain, tried in order"
    r = env["sc"].get(f"/fbchain2/x/{uid()}")
    assert r.status_code == 200 and r.text == "second-fallback"
    assert r.headers.get("x-riprap-fallback") == "static"


def test_retried_4xx_is_still_never_replaced_by_fallback(env: dict[str, Any]) -> None:
    # contract §4: retry on a status; "It never replaces an upstream 4xx."
    sc, A = env["sc"], env["A"]
    i = uid()
    r = sc.get(f"/retry4xx/s/429/{i}")
    assert len(A.hits(i)) == 2 and attempts(r) == 2
    assert r.status_code == 429 and r.text == "A says 429"
    assert "x-riprap-fallback" not in r.headers


def test_file_fallback(env: dict[str, Any]) -> None:
    # contract §4: "fallback status CODE file "PATH"" (relative to the policy file)
    r = env["sc"].get(f"/fbfile/x/{uid()}")
    assert r.status_code == 503 and r.text == FALLBACK_FILE
    assert r.headers.get("x-riprap-fallback") == "static"
    assert reason(r) == "upstream-failed"  # section 9: riprap made this answer
    attempts(r)


def _kept_as_stale(sc: Any, answer_headers: dict[str, str],
                   request_headers: dict[str, str] | None = None) -> bool:
    """Is a good answer with these headers (to a request with these) kept as a stale copy?"""
    path = flipset_path("/stalesvc", answer_headers)
    first = sc.get(path, headers=request_headers)
    assert first.status_code == 200, first.text
    sc.client.cookies.clear()  # httpx keeps a Set-Cookie: the next call would send a Cookie
    again = sc.get(path, headers=request_headers)  # the upstream now answers 503
    sc.client.cookies.clear()
    if again.headers.get("x-riprap-fallback") == "stale":
        assert again.status_code == 200 and again.json() == first.json()
        return True
    assert again.status_code == 503 and again.text == "flipped"  # passed through
    return False


def test_stale_copy_only_where_a_shared_cache_could_store_it(env: dict[str, Any]) -> None:
    # contract §9: "Stale answers are kept only when a shared cache could store them (RFC 9111)"
    sc = env["sc"]
    assert _kept_as_stale(sc, {})
    assert _kept_as_stale(sc, {"Cache-Control": "max-age=60"})
    for answer in ({"Set-Cookie": "s=1; Path=/"}, {"Cache-Control": "private"},
                   {"Cache-Control": "no-store"}, {"Cache-Control": "max-age=5, private"},
                   {"Vary": "*"}):
        assert not _kept_as_stale(sc, answer), answer
    # "never for a request with Authorization (unless the answer says Cache-Control: public)"
    assert not _kept_as_stale(sc, {}, {"Authorization": "Bearer t"})
    assert _kept_as_stale(sc, {"Cache-Control": "public, max-age=60"}, {"Authorization": "Bearer t"})
    # "or Cookie"
    assert not _kept_as_stale(sc, {}, {"Cookie": "sid=1"})


def test_stale_key_includes_the_headers_vary_names(env: dict[str, Any]) -> None:
    # contract §9: "the request headers that Vary names are part of the key"
    sc = env["sc"]
    path = flipset_path("/stalesvc", {"Vary": "X-Lang"})
    assert sc.get(path, headers={"X-Lang": "en"}).status_code == 200
    r = sc.get(path, headers={"X-Lang": "de"})
    assert r.status_code == 503 and r.headers.get("x-riprap-fallback") is None
    r = sc.get(path, headers={"X-Lang": "en"})
    assert r.status_code == 200 and r.headers.get("x-riprap-fallback") == "stale"
    assert r.json()["headers"]["x-lang"] == "en"
