"""Mesh analysis on meshes with known answers, built from plan dataclasses (no parser involved)."""

from __future__ import annotations

from dataclasses import replace

from mesh_fixtures import chain, svc, unit

from dsl import mesh as m
from dsl.analysis import analyse, explain_mesh
from dsl.diagnostics import Span
from dsl.plan import BreakerSpec, RetrySpec, ShardPlan, ShardingSpec
from dsl.units import CompiledUnit


def codes(diags):
    return [d.code for d in diags]


# ---- retry amplification ----------------------------------------------------------------


def test_chain_amplification_computed_by_hand():
    # edge --retry 3--> api --retry 2--> ledger --retry 2--> db
    units = chain(("edge", 0), ("api", 3), ("ledger", 2), ("db", 2))
    diags = analyse(units)
    assert codes(diags) == ["RP401", "RP401"]
    ledger, db = diags
    assert ledger.message == (
        "retry amplification: edge → api → ledger: 4 × 3 = 12 attempts on ledger per edge call"
    )
    assert ledger.span == Span("mesh/api.riprap", 3, 1)  # api's `service ledger` line
    assert db.message == (
        "retry amplification: edge → api → ledger → db: 4 × 3 × 3 = 36 attempts on db per edge call"
    )
    assert db.span == Span("mesh/ledger.riprap", 3, 1)
    assert db.severity == "warning"
    assert "largest factor is edge → api (4 attempts)" in (db.hint or "")


def test_threshold_is_a_parameter_and_exclusive():
    units = chain(("edge", 0), ("api", 3), ("ledger", 2), ("db", 2))
    assert codes(analyse(units, max_amplification=36)) == []
    assert codes(analyse(units, max_amplification=35.5)) == ["RP401"]
    assert len(analyse(units, max_amplification=1)) == 3  # api (4), ledger (12), db (36)


def test_hedges_count_as_attempts():
    units = [unit("edge", svc("api", 2, hedges=2)), unit("api", svc("db", 1, hedges=1))]
    (d,) = analyse(units)
    assert d.message.startswith("retry amplification: edge → api → db: 5 × 3 = 15 attempts on db")


def test_budget_gives_the_steady_state_figure_but_not_the_threshold():
    units = [unit("edge", svc("api", 3, budget=0.2)), unit("api", svc("db", 3, budget=0.1))]
    (d,) = analyse(units)
    assert d.message == (
        "retry amplification: edge → api → db: 4 × 4 = 16 attempts on db per edge call; "
        "with the retry budgets on this path about 1.2 × 1.1 ≈ 1.32 in steady state, "
        "but a budget's floor lets every retry through at low traffic"
    )


def test_diamond_reports_the_worst_of_two_paths_to_the_same_service():
    # edge → api (×3) → db (×2) = 6 ; edge → worker (×2) → db (×5) = 10 ; edge → db direct (×1)
    units = [
        unit("edge", svc("api", 2), svc("worker", 1), svc("db", 0)),
        unit("api", svc("db", 1)),
        unit("worker", svc("db", 4)),
    ]
    (d,) = analyse(units, max_amplification=8)
    assert d.message == (
        "retry amplification: edge → worker → db: 2 × 5 = 10 attempts on db per edge call"
    )
    assert d.span == Span("mesh/worker.riprap", 3, 1)
    mesh = m.build(units)
    paths = m.worst_paths(mesh, "app:edge")
    assert {m.node_name(n): r.amplification for n, r in paths.items()} == {
        "api": 3,
        "worker": 2,
        "db": 10,
    }
    # every request, all paths: api 3 + worker 2 + db 1 + 3*2 + 2*5
    assert m.total_requests(mesh, "app:edge") == 3 + 2 + 1 + 6 + 10


def test_sharded_service_counts_its_worst_shard():
    shards = (
        ShardPlan(name="a", endpoints=(), timeout=5.0, retry=RetrySpec(retries=1)),
        ShardPlan(name="b", endpoints=(), timeout=5.0, retry=RetrySpec(retries=4)),
    )
    users = replace(svc("users"), sharding=ShardingSpec(by="header", key="X-User"), shards=shards)
    units = [unit("edge", svc("api", 2)), unit("api", users)]
    (d,) = analyse(units)
    assert "edge → api → users: 3 × 5 = 15 attempts on users per edge call" in d.message


def test_only_entry_apps_start_paths():
    # api is called by edge, so api is not an entry: db is reported once, from edge.
    units = chain(("edge", 0), ("api", 3), ("db", 3))
    diags = analyse(units)
    assert [d.message.split(":")[1].strip() for d in diags] == ["edge → api → db"]


# ---- calm mesh ----------------------------------------------------------------------------


def test_calm_mesh_has_no_findings():
    units = [
        unit("edge", svc("api", 1, timeout=4.0), svc("search", 0, timeout=1.0)),
        unit("api", svc("ledger", 1, timeout=1.5), svc("accounts", 2, timeout=1.0, per_try=0.3)),
        unit("ledger", svc("db", 1, timeout=0.5)),
    ]
    assert analyse(units) == []


def test_files_with_errors_are_left_out():
    broken = CompiledUnit(path="mesh/broken.riprap", source="app ??\n", plan=None)
    units = chain(("edge", 0), ("api", 3), ("db", 3)) + [broken]
    assert codes(analyse(units)) == ["RP401"]
    assert analyse([broken]) == []


# ---- deadline inversion -------------------------------------------------------------------


def test_inversion_names_both_timeouts_and_the_path():
    units = [
        unit("edge", svc("api", None, timeout=1.0)),
        unit("api", svc("ledger", 2, timeout=3.0, per_try=0.8, backoff=(0.1, 1.0)), svc("cache", None, timeout=0.2)),
    ]
    (d,) = analyse(units)
    assert d.code == "RP402"
    assert d.span == Span("mesh/edge.riprap", 3, 1)
    assert d.message == (
        "deadline inversion: edge → api → ledger: edge's timeout for api is 1s, but api can keep "
        "working on ledger for 2.7s (api's timeout 3s for ledger: "
        "min(3s, 3 × 800ms + 100ms + 200ms) = 2.7s)"
    )
    assert d.hint == (
        "raise edge's timeout for api above 2.7s, or lower api's timeout or retries for ledger below 1s"
    )


def test_inversion_against_a_per_try_timeout():
    units = [
        unit("edge", svc("api", 1, timeout=4.0, per_try=0.5)),
        unit("api", svc("ledger", None, timeout=1.0)),
    ]
    (d,) = analyse(units)
    assert d.message.startswith(
        "deadline inversion: edge → api → ledger: edge's per-try timeout for api is 500ms, "
        "but api can keep working on ledger for 1s"
    )


def test_no_inversion_when_the_caller_waits_long_enough():
    units = [
        unit("edge", svc("api", None, timeout=1.0)),
        unit("api", svc("ledger", None, timeout=1.0)),
    ]
    assert analyse(units) == []


def test_fallback_service_time_counts_in_the_callee_worst_case():
    units = [
        unit("edge", svc("api", None, timeout=1.0)),
        unit("api", svc("ledger", None, timeout=0.6, fallback=["replica"]), svc("replica", None, timeout=0.5)),
    ]
    (d,) = analyse(units)
    assert "api can keep working on ledger for 1.1s" in d.message
    assert "then 500ms of fallback service" in d.message


# ---- cycles --------------------------------------------------------------------------------


def test_call_cycle_is_an_error_naming_the_cycle():
    units = [
        unit("a", svc("b", 1)),
        unit("b", svc("c", 1)),
        unit("c", svc("a", 1), svc("db", 1)),
    ]
    diags = analyse(units)
    (d,) = [x for x in diags if x.code == "RP403"]
    assert d.severity == "error"
    assert d.message.startswith("call cycle: a → b → c → a;")
    assert d.span == Span("mesh/a.riprap", 3, 1)


def test_two_app_cycle_and_the_rest_of_the_mesh_still_analysed():
    units = [
        unit("edge", svc("api", 3)),
        unit("api", svc("worker", 2), svc("db", 3)),
        unit("worker", svc("api", 1)),
    ]
    diags = analyse(units)
    assert [d.message.split(";")[0] for d in diags if d.code == "RP403"] == [
        "call cycle: api → worker → api"
    ]
    # the edge inside the cycle is left out of the path math; edge → api → db still counts
    amps = [d.message for d in diags if d.code == "RP401"]
    assert amps == ["retry amplification: edge → api → db: 4 × 4 = 16 attempts on db per edge call"]


def test_service_named_like_its_own_app_is_a_leaf_not_a_cycle():
    units = [unit("payments", svc("payments", 1))]
    assert analyse(units) == []
    assert m.build(units).out["app:payments"][0].target == "svc:payments"


def test_fallback_cycle_is_an_error():
    u = unit(
        "shop",
        svc("a", None, fallback=["b"]),
        svc("b", None, fallback=["c"]),
        svc("c", None, fallback=["a"]),
        svc("d", None, fallback=["a"]),
    )
    (d,) = analyse([u])
    assert d.code == "RP404"
    assert d.severity == "error"
    assert d.message.startswith("fallback cycle: a → b → c → a;")
    assert d.span == Span("mesh/shop.riprap", 3, 1)


def test_fallback_chain_without_cycle_is_fine():
    u = unit("shop", svc("a", None, fallback=["b"]), svc("b", None, fallback=["c"]), svc("c"))
    assert analyse([u]) == []


def test_long_chain_needs_no_recursion():
    n = 3000
    units = [unit(f"a{i}", svc(f"a{i + 1}", None)) for i in range(n)]
    units.append(unit(f"a{n}", svc("a0", None)))
    (d,) = analyse(units)
    assert d.code == "RP403"
    assert d.message.startswith("call cycle: a0 → a1 → a2 → ")


# ---- single-file checks ---------------------------------------------------------------------


def test_breaker_min_larger_than_window_is_left_to_the_checker():
    # RP216 (an error of the checker) stops such a file before analysis; no duplicate here.
    s = replace(svc("pay"), breaker=BreakerSpec(kind="rate", rate=0.5, window=10, min_calls=20))
    assert analyse([unit("shop", s)]) == []


def test_breaker_at_100_percent_without_slow_calls():
    s = replace(svc("pay"), breaker=BreakerSpec(kind="rate", rate=1.0))
    (d,) = analyse([unit("shop", s)])
    assert d.code == "RP405"
    assert "failure-rate 100%" in d.message
    slow = replace(svc("pay"), breaker=BreakerSpec(kind="rate", rate=1.0, slow=0.5))
    fine = replace(svc("pay"), breaker=BreakerSpec(kind="consecutive", failures=5))
    assert analyse([unit("shop", slow)]) == analyse([unit("shop", fine)]) == []


def test_hedge_whose_retry_conditions_never_match():
    only_2xx = replace(svc("rec", hedges=1), retry=RetrySpec(retries=2, on=("200", "3xx")))
    (d,) = analyse([unit("shop", only_2xx)])
    assert d.code == "RP406"
    assert d.message == (
        "hedge on service 'rec' sends extra copies of calls, but its retry statement retries "
        "only on 200, 3xx, which never mark a try as failed: the retry repeats nothing, "
        "and the hedge repeats calls anyway"
    )
    real = replace(svc("rec", hedges=1), retry=RetrySpec(retries=2, on=("429", "3xx")))
    no_retry = svc("rec", None, hedges=1)
    not_hedged = replace(svc("rec"), retry=RetrySpec(retries=2, on=("200",)))
    for s in (real, no_retry, not_hedged):
        assert analyse([unit("shop", s)]) == []


def test_shard_findings_said_once_when_inherited_and_per_shard_when_own():
    bad = BreakerSpec(kind="rate", rate=1.0, window=20)
    worse = BreakerSpec(kind="rate", rate=1.0, window=10)
    shards = (
        ShardPlan(name="a", endpoints=(), breaker=bad),
        ShardPlan(name="b", endpoints=(), breaker=worse),
    )
    s = replace(svc("users"), breaker=bad, sharding=ShardingSpec(by="header", key="X"), shards=shards)
    diags = analyse([unit("shop", s)])
    assert [d.message.split(" can")[0] for d in diags] == [
        "breaker on service 'users'",
        "breaker on shard 'b' of service 'users'",
    ]


def test_duplicate_app_names_warn_and_keep_the_first_file():
    first = unit("api", svc("db", 1), path="a/api.riprap")
    second = unit("api", svc("other", 1), path="b/api.riprap")
    (d,) = analyse([first, second])
    assert d.code == "RP407"
    assert d.span == Span("b/api.riprap", 1, 1)
    assert "also declared in a/api.riprap" in d.message


# ---- explain ---------------------------------------------------------------------------------


def test_explain_mesh_states_fan_out_and_time():
    units = [
        unit("edge", svc("api", 3, timeout=2.0)),
        unit("api", svc("ledger", 2, timeout=1.0), svc("db", 1, timeout=0.3)),
    ]
    text = explain_mesh(units)
    assert text.splitlines()[0] == "mesh: 2 apps, 2 leaf services, entry apps: edge"
    assert "app edge (entry)  [mesh/edge.riprap]" in text
    assert (
        "  worst-case fan-out: 12 attempts on ledger per edge call (edge → api → ledger: 4 × 3 = 12)"
        in text
    )
    assert "  up to 24 upstream requests in all per edge call" in text  # 4 + 4*3 + 4*2
    assert "  worst-case time for its dependencies: 2s (on api: min(2s, 4 × 2s) = 2s)" in text
    assert "  reaches: api ×4, ledger ×12, db ×8" in text
    assert explain_mesh([]) == ""


def test_equal_times_are_no_inversion_despite_float_sums():
    # 3 × 800ms + 100ms + 200ms adds up to 2.7000000000000006 in floats
    units = [
        unit("edge", svc("api", None, timeout=2.7)),
        unit("api", svc("ledger", 2, timeout=3.0, per_try=0.8, backoff=(0.1, 1.0))),
    ]
    assert analyse(units) == []
    units[0] = unit("edge", svc("api", None, timeout=2.69))
    assert [d.code for d in analyse(units)] == ["RP402"]
