"""Hop-by-hop filtering in both directions (RFC 9110 7.6.1)."""

from __future__ import annotations

import pytest

from sidecar.proxy import _forward_headers, _response_headers


def test_request_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    headers = [
        (b"host", b"payments:7400"), (b"connection", b"keep-alive, X-Secret"),
        (b"keep-alive", b"timeout=5"), (b"te", b"trailers"), (b"upgrade", b"h2c"),
        (b"proxy-authorization", b"Basic eA=="), (b"proxy-connection", b"keep-alive"),
        (b"x-secret", b"1"), (b"x-keep", b"2"), (b"content-length", b"3"),
        (b"expect", b"100-continue"),
    ]
    out, host, has_body = _forward_headers(headers)
    assert out == [(b"x-keep", b"2"), (b"content-length", b"3")]
    assert host == "payments:7400"
    assert has_body


def test_request_body_is_detected_from_chunked_framing_not_from_zero_length() -> None:
    assert _forward_headers([(b"transfer-encoding", b"chunked")])[2] is True
    assert _forward_headers([(b"content-length", b"0")])[2] is False
    assert _forward_headers([(b"accept", b"*/*")])[2] is False


def test_response_hop_by_hop_headers_are_dropped_and_names_lowercased() -> None:
    raw = [(b"Content-Type", b"text/plain"), (b"Transfer-Encoding", b"chunked"),
           (b"Connection", b"close, X-Hop"), (b"X-Hop", b"1"), (b"Keep-Alive", b"x"),
           (b"Content-Length", b"5"), (b"X-Riprap-Attempts", b"1")]
    out, length = _response_headers(raw)
    assert out == [(b"content-type", b"text/plain"), (b"content-length", b"5"),
                   (b"x-riprap-attempts", b"1")]
    assert length == 5


@pytest.mark.parametrize("target", [b"/", b"/a/b", b"/a%2Fb?x=1&y=%20z", b"/p?q", b"/%E2%82%AC/x"])
def test_fast_url_equals_httpx_public_url(target: bytes) -> None:
    import httpx

    from sidecar.proxy import make_url

    got = make_url("svc", target)
    assert got == httpx.URL(scheme="http", host="svc", raw_path=target)
    assert got.raw_path == target and got.host == "svc"


def test_one_hop_by_hop_rule_for_the_proxy_the_engine_and_the_stale_cache() -> None:
    from policies.headers import HOP_BY_HOP, NOT_CACHED, forward_headers

    # several Connection headers: every header any of them names is dropped, both ways
    raw = [(b"Connection", b"x-a"), (b"Connection", b"X-B, keep-alive"), (b"X-A", b"1"),
           (b"x-b", b"2"), (b"x-c", b"3"), (b"TE", b"trailers")]
    assert _forward_headers(raw)[0] == [(b"x-c", b"3")]
    assert forward_headers(raw)[0] == [(b"x-c", b"3")]
    assert _response_headers(raw)[0] == [(b"x-c", b"3")]
    assert {h.decode() for h in HOP_BY_HOP} <= NOT_CACHED
