"""One host-routing rule for the engine and the sidecar's router: name or alias, case,
port and trailing dot ignored, IPv6 literals with or without brackets."""

from __future__ import annotations

import random

import httpx
import pytest

from dsl.plan import EndpointSpec, Plan, ServicePlan
from policies.clock import FakeClock
from policies.env import Env
from policies.hosts import CACHE_SIZE, HostTable, host_key
from policies.runtime import PlanRuntime
from policies.safe_observer import SafeObserver
from sidecar.routing import Route, Router


def plan() -> Plan:
    ep = (EndpointSpec("http://127.0.0.1:9001"),)
    return Plan(services={
        "local": ServicePlan("local", hosts=("::1", "Local.Example."), endpoints=ep),
        "six": ServicePlan("six", hosts=("[fd00::7]",), endpoints=ep),
        "api": ServicePlan("api", endpoints=ep),
    })


def runtime() -> PlanRuntime:
    env = Env(FakeClock(), random.Random(1), SafeObserver(None),
              httpx.MockTransport(lambda r: httpx.Response(200)), False)
    return PlanRuntime(plan(), env)


CASES = [
    ("[::1]:7400", "local"), ("[::1]", "local"), ("::1", "local"), ("[::1]:80", "local"),
    ("fd00::7", "six"), ("[FD00::7]:443", "six"), ("[fd00::7]", "six"),
    ("local.example", "local"), ("LOCAL.EXAMPLE:8080", "local"), ("local.example.", "local"),
    ("API", "api"), ("api:1", "api"),
    ("[::2]:80", None), ("::2", None), ("nope", None), ("127.0.0.1:7400", None),
]


@pytest.mark.parametrize("host,service", CASES)
def test_the_engine_and_the_router_agree_on_every_host(host: str, service: str | None) -> None:
    assert runtime().service_for_host(host) == service
    routed = Router(plan()).route("GET", host, b"/x", None)
    assert (routed.service if isinstance(routed, Route) else None) == service
    proxied = Router(plan()).route("GET", None, b"/x", host)  # forward-proxy target
    assert (proxied.service if isinstance(proxied, Route) else None) == service


def test_host_key_strips_brackets_port_case_and_dot() -> None:
    assert [host_key(h) for h in ("[::1]:7400", "[::1]", "::1", "A.B.:80")] == \
        ["::1", "::1", "::1", "a.b"]


def test_a_name_wins_over_another_services_alias() -> None:
    table = HostTable({"a": ("b",), "b": ()})
    assert table.service_for_host("b") == "b"


def test_the_spelling_cache_is_bounded() -> None:
    table = HostTable({"a": ()})
    for i in range(CACHE_SIZE * 2 + 5):
        assert table.service_for_host(f"h{i}") is None
    assert table.service_for_host("A:1") == "a"
    assert len(table._seen) <= CACHE_SIZE
    assert table.service_for_host("x" * 10_000) is None  # long ones are not kept
    assert "x" * 10_000 not in table._seen
