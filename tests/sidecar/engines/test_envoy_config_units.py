"""Pure checks of the Envoy back end: names, durations, token buckets, tiers, retries,
notes, and the files write_config produces (atomically, in a stable order)."""

from __future__ import annotations

from pathlib import Path

import yaml

from dsl.plan import (
    BackoffSpec,
    EndpointSpec,
    HedgeSpec,
    Plan,
    RetrySpec,
    ServicePlan,
    ShardingSpec,
    ShardPlan,
)
from sidecar.engines.envoy import EnvoyPorts, build_config, cluster_name, write_config
from sidecar.engines.envoy.listeners import token_bucket
from sidecar.engines.envoy.units import duration

PORTS = EnvoyPorts("127.0.0.1", 7400, 7401)


def _config(tmp_path: Path, **services: ServicePlan) -> dict[str, dict]:  # type: ignore[type-arg]
    return build_config(Plan(app="t", services=services), PORTS, dynamic_dir=tmp_path, chaos=False).resources


def _routes(resources: dict[str, dict], vhost: str) -> list[dict]:  # type: ignore[type-arg]
    for v in resources["rds.yaml"]["resources"][0]["virtual_hosts"]:
        if v["name"] == vhost:  # without the CONNECT refusal that opens every virtual host
            return [r for r in v["routes"] if "connect_matcher" not in r["match"]]
    raise AssertionError(vhost)


def test_cluster_names_are_stable() -> None:
    assert cluster_name("payments") == "payments"
    assert cluster_name("inventory", "a") == "inventory/a"


def test_durations() -> None:
    assert duration(2) == "2s"
    assert duration(0.25) == "0.25s"
    assert duration(0.0000001) == "0.000001s"
    assert duration(90) == "90s"


def test_token_buckets_are_exact_for_whole_rates() -> None:
    assert token_bucket(200, 50) == {"max_tokens": 50, "tokens_per_fill": 10, "fill_interval": "0.05s"}
    assert token_bucket(50, 20) == {"max_tokens": 20, "tokens_per_fill": 5, "fill_interval": "0.1s"}
    assert token_bucket(1, 1) == {"max_tokens": 1, "tokens_per_fill": 1, "fill_interval": "1s"}
    assert token_bucket(10 / 60, 3) == {"max_tokens": 3, "tokens_per_fill": 1, "fill_interval": "6s"}


def test_failover_tiers_are_priorities_that_never_spill_early(tmp_path: Path) -> None:
    svc = ServicePlan(name="pay", endpoints=(
        EndpointSpec("http://127.0.0.1:1"), EndpointSpec("http://127.0.0.1:2", weight=3),
        EndpointSpec("http://127.0.0.1:3", tier=1), EndpointSpec("http://127.0.0.1:4", tier=5)))
    cluster = _config(tmp_path, pay=svc)["cds.yaml"]["resources"][0]
    la = cluster["load_assignment"]
    assert [g["priority"] for g in la["endpoints"]] == [0, 1, 2]
    assert [e["load_balancing_weight"] for e in la["endpoints"][0]["lb_endpoints"]] == [1, 3]
    assert la["policy"]["overprovisioning_factor"] >= 100_000
    assert cluster["lb_policy"] == "LEAST_REQUEST"
    # no retry budget: Envoy's default cap of 3 retries in flight is lifted
    assert cluster["circuit_breakers"]["thresholds"][0]["max_retries"] >= 1_000_000


def test_retry_policy_and_method_routes(tmp_path: Path) -> None:
    retry = RetrySpec(retries=3, on=("connect-failure", "503", "5xx"), per_try_timeout=0.2,
                      backoff=BackoffSpec("exponential", 0.01, 0.1, "full"))
    svc = ServicePlan(name="pay", endpoints=(EndpointSpec("http://127.0.0.1:1"),
                                              EndpointSpec("http://127.0.0.1:2", tier=1)), retry=retry)
    resources = _config(tmp_path, pay=svc)
    idem, safe, other = _routes(resources, "service:pay")
    assert idem["match"]["headers"] == [{"name": "idempotency-key", "present_match": True}]
    policy = safe["route"]["retry_policy"]
    # Envoy resends connect failures itself, and the answers the upstream Lua filter marks
    assert policy["retry_on"] == "connect-failure,retriable-headers"
    assert policy["retriable_headers"] == [{"name": "x-riprap-retry", "present_match": True}]
    assert policy["num_retries"] == 3 and policy["per_try_timeout"] == "0.2s"
    # with a per-try timer Envoy waits itself (a wait in the attempt's filters would use the
    # per-try time up): the backoff, and a Retry-After the upstream Lua filter passes on
    assert policy["retry_back_off"] == {"base_interval": "0.01s", "max_interval": "0.1s"}
    assert policy["rate_limited_retry_back_off"]["reset_headers"] == [
        {"name": "x-riprap-retry-after", "format": "SECONDS"}]
    tries = safe["metadata"]["filter_metadata"]["envoy.filters.http.lua"]["tries"]
    assert tries["codes"] == list(range(500, 600)) and tries["retries"] == 3 and not tries["hedge"]
    assert tries["waits"] is False
    assert tries["backoff"] == {"kind": "exponential", "base_ms": 10.0, "max_ms": 100.0, "jitter": "full"}
    assert {"x-riprap-retry", "x-riprap-retry-after"} <= set(safe["response_headers_to_remove"])
    router = resources["lds.yaml"]["resources"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "http_filters"][-1]["typed_config"]
    assert [f["name"] for f in router["upstream_http_filters"]] == [
        "envoy.filters.http.lua", "riprap.envoy_added", "envoy.filters.http.upstream_codec"]
    assert policy["retry_priority"]["name"] == "envoy.retry_priorities.previous_priorities"
    assert policy["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    # other methods: only connect failures (nothing was sent)
    assert other["route"]["retry_policy"]["retry_on"] == "connect-failure"
    assert other["metadata"]["filter_metadata"]["envoy.filters.http.lua"]["tries"]["codes"] == []
    assert "headers" not in other["match"]


def test_hedge_after_is_a_hedge_on_the_per_try_timeout(tmp_path: Path) -> None:
    svc = ServicePlan(name="recs", endpoints=(EndpointSpec("http://127.0.0.1:1"),),
                      hedge=HedgeSpec(delay=0.08, max_extra=2))
    _, safe, other = _routes(_config(tmp_path, recs=svc), "service:recs")
    assert safe["route"]["hedge_policy"] == {"hedge_on_per_try_timeout": True}
    assert safe["route"]["retry_policy"]["per_try_timeout"] == "0.08s"
    assert safe["route"]["retry_policy"]["num_retries"] == 2
    assert "hedge_policy" not in other["route"] and "retry_policy" not in other["route"]


def test_sharded_service_routes_each_shard_by_the_lua_pick(tmp_path: Path) -> None:
    svc = ServicePlan(name="inv", sharding=ShardingSpec("header", "X-Sku", default="b"), shards=(
        ShardPlan("a", (EndpointSpec("http://127.0.0.1:1"),), timeout=1.0),
        ShardPlan("b", (EndpointSpec("http://127.0.0.1:2"),), timeout=2.5)))
    resources = _config(tmp_path, inv=svc)
    assert [c["name"] for c in resources["cds.yaml"]["resources"]] == ["inv/a", "inv/b"]
    routes = _routes(resources, "service:inv")
    assert [r["route"]["cluster"] for r in routes[:2]] == ["inv/a", "inv/b"]
    assert routes[0]["match"]["headers"] == [{"name": "x-riprap-shard", "string_match": {"exact": "a"}}]
    meta = routes[0]["metadata"]["filter_metadata"]["envoy.filters.http.lua"]["shard"]
    assert meta == {"by": "header", "key": "X-Sku", "names": ["a", "b"], "timeouts": {"a": 1000, "b": 2500},
                    "default": "b"}
    assert routes[2]["direct_response"]["status"] == 400  # reached only without a pick
    prefixed = [r for r in _routes(resources, "riprap:unknown") if r.get("route", {}).get("cluster") == "inv/a"]
    assert prefixed[0]["route"]["prefix_rewrite"] == "/"


def test_write_config_is_atomic_and_ordered(tmp_path: Path) -> None:
    svc = ServicePlan(name="pay", endpoints=(EndpointSpec("http://127.0.0.1:1/base"),))
    config = build_config(Plan(app="t", services={"pay": svc}), PORTS, dynamic_dir=tmp_path / "dyn", chaos=False)
    paths = write_config(config, tmp_path / "out", dynamic_dir=tmp_path / "dyn")
    assert [p.name for p in paths] == ["envoy.yaml", "cds.yaml", "ecds-upstream.yaml", "ecds.yaml", "rds.yaml", "lds.yaml"]
    assert paths[0].parent == tmp_path / "out" and paths[1].parent == tmp_path / "dyn"
    assert sorted(p.name for p in (tmp_path / "dyn").iterdir()) == ["cds.yaml", "ecds-upstream.yaml", "ecds.yaml", "lds.yaml", "rds.yaml"]
    boot = yaml.safe_load(paths[0].read_text())
    assert boot["dynamic_resources"]["cds_config"]["path_config_source"]["watched_directory"] == {
        "path": str(tmp_path / "dyn")}
    route = yaml.safe_load(paths[4].read_text())["resources"][0]["virtual_hosts"][0]["routes"][1]
    assert route["route"]["prefix_rewrite"] == "/base/"  # the endpoint's own path prefix
    again = write_config(config, tmp_path / "out", dynamic_dir=tmp_path / "dyn")
    assert [p.read_text() for p in again] == [p.read_text() for p in paths]


def test_the_upstream_lua_filter_waits_where_no_per_try_timer_runs(tmp_path: Path) -> None:
    retry = RetrySpec(retries=2, on=("503",), backoff=BackoffSpec("exponential", 0.1, 1.0, "none"))
    svc = ServicePlan(name="pay", endpoints=(EndpointSpec("http://127.0.0.1:1"),), retry=retry)
    resources = _config(tmp_path, pay=svc)
    _, safe, _ = _routes(resources, "service:pay")
    policy = safe["route"]["retry_policy"]
    assert policy["retry_back_off"] == {"base_interval": "0.001s", "max_interval": "0.001s"}
    assert "rate_limited_retry_back_off" not in policy
    assert safe["metadata"]["filter_metadata"]["envoy.filters.http.lua"]["tries"]["waits"] is True
    # its waits: a `/sleep` on Envoy's own listener, held by the `riprap.delay` fault filter
    sleep = [r for r in _routes(resources, "riprap:state") if r["match"] == {"path": "/sleep"}]
    assert sleep and sleep[0]["direct_response"]["status"] == 204
    assert "_riprap_self" in [c["name"] for c in resources["cds.yaml"]["resources"]]
