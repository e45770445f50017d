"""Routing table: Host (port ignored), absolute-form, `/NAME/` prefix, refusals."""

from __future__ import annotations

import json

import pytest

from dsl.plan import EndpointSpec, Plan, ServicePlan
from policies.hosts import host_key
from sidecar.routing import Refusal, Route, Router


def plan() -> Plan:
    ep = (EndpointSpec("http://127.0.0.1:9001"),)
    return Plan(services={
        "payments": ServicePlan("payments", hosts=("pay.internal", "Payments.Example:8080"),
                                endpoints=ep),
        "inventory": ServicePlan("inventory", endpoints=ep),
    })


@pytest.mark.parametrize("host,expected", [
    ("Example.COM:80", "example.com"), ("[::1]:7400", "::1"), ("a.b.", "a.b"),
    ("payments", "payments"), ("::1", "::1"),
])
def test_host_key(host: str, expected: str) -> None:
    assert host_key(host) == expected


@pytest.mark.parametrize("host", ["payments", "PAYMENTS:9999", "pay.internal", "payments.example"])
def test_host_header_routes_by_name_or_alias_port_ignored(host: str) -> None:
    assert Router(plan()).route("GET", host, b"/a/b", None) == Route("payments", b"/a/b")


def test_host_wins_over_path_prefix() -> None:
    assert Router(plan()).route("GET", "payments", b"/inventory/x", None) == \
        Route("payments", b"/inventory/x")


@pytest.mark.parametrize("path,rest", [
    (b"/inventory/items/7", b"/items/7"), (b"/inventory", b"/"), (b"/inventory/", b"/"),
    (b"/inventory?x=1", b"/?x=1"), (b"/inventory/a%2Fb", b"/a%2Fb"),
])
def test_path_prefix_strips_the_service_name(path: bytes, rest: bytes) -> None:
    assert Router(plan()).route("GET", "127.0.0.1:7400", path, None) == Route("inventory", rest)


def test_unknown_host_and_path_is_404_naming_known_services() -> None:
    got = Router(plan()).route("GET", "127.0.0.1:7400", b"/nope/x", None)
    assert isinstance(got, Refusal)
    assert (got.status, got.reason) == (404, "unknown-service")
    body = json.loads(got.body)
    assert body["services"] == ["inventory", "payments"]
    assert "nope" in body["error"]


def test_unknown_named_host_is_reported_by_host() -> None:
    got = Router(plan()).route("GET", "evil.example", b"/x", None)
    assert isinstance(got, Refusal) and got.status == 404
    assert "evil.example" in json.loads(got.body)["error"]


def test_forward_proxy_form_routes_by_target_host() -> None:
    r = Router(plan())
    assert r.route("GET", "pay.internal", b"/p", "pay.internal") == Route("payments", b"/p")


def test_forward_proxy_form_to_unknown_host_is_403_even_with_a_service_prefix() -> None:
    got = Router(plan()).route("GET", "evil.example", b"/payments/x", "evil.example")
    assert isinstance(got, Refusal)
    assert (got.status, got.reason) == (403, "unknown-service")
    assert json.loads(got.body)["services"] == ["inventory", "payments"]


def test_connect_is_refused_403_unknown_405_known() -> None:
    r = Router(plan())
    unknown = r.route("CONNECT", None, b"", "evil.example:443")
    known = r.route("CONNECT", None, b"", "payments:443")
    assert isinstance(unknown, Refusal) and unknown.status == 403
    assert unknown.reason == "unknown-service"
    assert isinstance(known, Refusal) and known.status == 405
    assert known.reason == "connect-unsupported"


def test_no_host_and_no_prefix_is_404() -> None:
    got = Router(plan()).route("GET", None, b"/", None)
    assert isinstance(got, Refusal) and got.status == 404
