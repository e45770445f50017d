"""Acceptance tests for mesh analysis: contract section 10 (and the exit codes of section 8).

Several files given to `riprap check` are joined into one graph: a service whose name is
another file's `app` (by default the file's stem) is that app.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from contract_helpers import errors, group_checks, parse_diags, run_scenarios, ungroup, warnings


def svc(name: str, timeout: str = "1s", extra: str = "", port: int = 9001) -> str:
    lines = [f"service {name} {{", f"    timeout {timeout}", f"    endpoint http://127.0.0.1:{port}"]
    lines += [f"    {line}" for line in extra.splitlines() if line.strip()]
    return "\n".join(lines) + "\n}\n"


def app(name: str, *services: str, declare: bool = True) -> dict[str, str]:
    """One file NAME.riprap declaring `app NAME` (or relying on its stem) and its services."""
    return {f"{name}.riprap": (f"app {name}\n" if declare else "") + "".join(services)}


def chain(edge_retry: int, api_retry: int, declare: bool = True) -> dict[str, str]:
    """edge -> api -> db; budgets and feasible timeouts so only amplification can fire."""
    return {
        **app("edge", svc("api", "2s", f"retry {edge_retry} budget 20%" if edge_retry else ""), declare=declare),
        **app("api", svc("db", "1s", f"retry {api_retry} budget 20%" if api_retry else "", port=9002), declare=declare),
    }


CHAIN = ["edge.riprap", "api.riprap"]

# name -> ({file: text}, [riprap arguments]); all run concurrently, once per module
SCENARIOS: dict[str, tuple[dict[str, str], list[str]]] = {
    "amp_12": (chain(2, 3), ["check", *CHAIN]),  # 3 x 4 = 12
    "amp_10": (chain(1, 4), ["check", "--strict", *CHAIN]),  # 2 x 5 = 10: not above 10
    "amp_1x12": (chain(0, 11), ["check", *CHAIN]),  # 1 x 12 = 12
    "amp_12_max_12": (chain(2, 3), ["check", "--max-amplification", "12", *CHAIN]),
    "amp_4_max_3": (chain(1, 1), ["check", "--max-amplification", "3", *CHAIN]),
    "amp_dir": ({f"mesh/{k}": v for k, v in chain(2, 3).items()}, ["check", "mesh"]),
    "amp_stems": (chain(2, 3, declare=False), ["check", *CHAIN]),
    # edge gives api 500ms, but api keeps working on ledger for up to 900ms
    "inv_plain": ({**app("edge", svc("api", "500ms")), **app("api", svc("ledger", "900ms", port=9002))},
                  ["check", *CHAIN]),
    "inv_none": ({**app("edge", svc("api", "1s")), **app("api", svc("ledger", "900ms", port=9002))},
                 ["check", "--strict", *CHAIN]),
    # 3 x 400ms + backoff > 1s
    "inv_retries": (
        {**app("edge", svc("api", "1s")),
         **app("api", svc("ledger", "3s", "retry 2 per-try 400ms backoff 50ms budget 20%", port=9002))},
        ["check", *CHAIN],
    ),
    "cycle_2": ({**app("a", svc("b")), **app("b", svc("a", port=9002))}, ["check", "a.riprap", "b.riprap"]),
    "cycle_3": (
        {**app("orders", svc("billing")), **app("billing", svc("notify", port=9002)),
         **app("notify", svc("orders", port=9003))},
        ["check", "orders.riprap", "billing.riprap", "notify.riprap"],
    ),
    "diamond": (
        {**app("gateway", svc("orders"), svc("reports", port=9002)), **app("orders", svc("db", port=9003)),
         **app("reports", svc("orders", port=9004))},
        ["check", "gateway.riprap", "orders.riprap", "reports.riprap"],
    ),
    "fb_cycle": (
        {"shop.riprap": svc("p", extra="fallback service q") + svc("q", port=9002, extra="fallback service r")
         + svc("r", port=9003, extra="fallback service p")},
        ["check", "shop.riprap"],
    ),
    "fb_cycle_compile": (
        {"shop.riprap": svc("p", extra="fallback service q") + svc("q", port=9002, extra="fallback service p")},
        ["compile", "shop.riprap"],
    ),
    "fb_self": ({"self.riprap": svc("p", extra="fallback service p")}, ["check", "self.riprap"]),
    "fb_chain": (
        {"chain.riprap": svc("p", extra="fallback service q") + svc("q", port=9002, extra='fallback status 503 text "x"')},
        ["check", "chain.riprap"],
    ),
    # lines 1-10: p <-> q fallback cycle; line 11: service w without endpoints
    "fb_cycle_and_error": (
        {"both.riprap": svc("p", extra="fallback service q") + svc("q", port=9002, extra="fallback service p")
         + "service w {\n    timeout 1s\n}\n"},
        ["check", "both.riprap"],
    ),
    "warn_and_error": (
        {"one.riprap": "service broken {\n    timeout 1s\n}\n" + svc("a", "20s")},
        ["check", "one.riprap"],
    ),
}


# one-file `check` scenarios share one run (grouped at the end of this module); each still
# gets a result of its own, narrowed to its files (its `rc` is the group's)
ONE_FILE_GROUP: dict[str, list[str]] = {}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    return ungroup(run_scenarios(tmp_path_factory.mktemp("mesh"), SCENARIOS), ONE_FILE_GROUP, "one_file")


def _mentions(diag, *names: str) -> bool:
    return all(n in diag.full for n in names)


# ---------------------------------------------------------------------------------------
# retry amplification
# ---------------------------------------------------------------------------------------


def _amplification(res):
    return [d for d in parse_diags(res.text) if _mentions(d, "edge", "api", "db")]


def test_s10_amplification_above_10_warns_with_its_path(mesh):
    # §10: the product of attempts along a call path; warning above 10 by default
    res = mesh["amp_12"]
    assert res.rc == 0, res.text  # a warning, not an error
    found = _amplification(res)
    assert found, res.text
    assert all(d.sev == "warning" for d in found)
    assert any("12" in d.full for d in found), res.text


def test_s10_amplification_of_exactly_10_is_not_reported(mesh):
    res = mesh["amp_10"]
    assert res.rc == 0
    assert not _amplification(res), res.text


def test_s10_amplification_counts_a_hop_without_retries(mesh):
    assert _amplification(mesh["amp_1x12"]), mesh["amp_1x12"].text


def test_s10_max_amplification_option(mesh):
    # §10: --max-amplification N moves the threshold
    res = mesh["amp_12_max_12"]
    assert res.rc == 0 and not _amplification(res), res.text
    assert _amplification(mesh["amp_4_max_3"]), mesh["amp_4_max_3"].text


def test_s10_amplification_through_a_directory(mesh):
    # §8: directories are checked too, and several files as one mesh
    assert _amplification(mesh["amp_dir"]), mesh["amp_dir"].text


def test_s10_app_name_defaults_to_file_stem_in_a_mesh(mesh):
    # §3 app defaults to the stem; §10 a service named like another file's app is that app
    assert _amplification(mesh["amp_stems"]), mesh["amp_stems"].text


# ---------------------------------------------------------------------------------------
# deadline inversion
# ---------------------------------------------------------------------------------------


def _inversion(res):
    return [d for d in parse_diags(res.text) if _mentions(d, "edge", "api")]


def test_s10_deadline_inversion_is_reported(mesh):
    res = mesh["inv_plain"]
    found = _inversion(res)
    assert found, res.text
    assert any("ledger" in d.full for d in found), res.text


def test_s10_no_deadline_inversion_when_caller_waits_longer(mesh):
    res = mesh["inv_none"]
    assert res.rc == 0, res.text
    assert not parse_diags(res.text), res.text


def test_s10_deadline_inversion_counts_the_callees_retries(mesh):
    # the callee's worst case for its dependency includes its retries
    assert _inversion(mesh["inv_retries"]), mesh["inv_retries"].text


# ---------------------------------------------------------------------------------------
# cycles (errors)
# ---------------------------------------------------------------------------------------


def test_s10_call_cycle_of_two_apps_is_an_error(mesh):
    res = mesh["cycle_2"]
    assert res.rc == 1, res.text
    assert any(_mentions(d, "a", "b") for d in errors(res)), res.text


def test_s10_call_cycle_of_three_apps_is_an_error(mesh):
    res = mesh["cycle_3"]
    assert res.rc == 1, res.text
    assert any(_mentions(d, "orders", "billing", "notify") for d in errors(res)), res.text


def test_s10_acyclic_diamond_is_not_a_cycle(mesh):
    res = mesh["diamond"]
    assert res.rc == 0, res.text
    assert not errors(res)


def test_s10_fallback_cycle_is_an_error(mesh):
    # §10: cycles in fallback chains are errors (one file is enough)
    assert errors(mesh["fb_cycle"]), mesh["fb_cycle"].text


def test_s8_s10_compile_rejects_a_fallback_cycle_like_check(mesh):
    # §8: compile: exit codes as check; §10: a fallback cycle is an error
    assert mesh["fb_cycle_compile"].rc == 1, mesh["fb_cycle_compile"].out[:200]


def test_s10_fallback_to_itself_is_an_error(mesh):
    assert errors(mesh["fb_self"]), mesh["fb_self"].text


def test_s10_fallback_chain_without_cycle_is_fine(mesh):
    assert not errors(mesh["fb_chain"]), mesh["fb_chain"].text


def test_s8_s10_fallback_cycle_reported_alongside_other_errors(mesh):
    res = mesh["fb_cycle_and_error"]
    lines = {d.line for d in errors(res)}
    assert 11 in lines, res.text  # service w (line 11): no endpoints
    assert lines & set(range(1, 11)), res.text  # the p -> q -> p cycle, on p's or q's lines


# ---------------------------------------------------------------------------------------
# single-file warnings
# ---------------------------------------------------------------------------------------

GOOD_RETRY = "retry 2 per-try 300ms backoff 100ms budget 20%"  # 3 x 300 + 100 + 100 = 1.1s

# one file per case, all checked in one run (they share no names, so the mesh adds nothing)
SINGLE_FILE_CASES = {
    "baseline": (svc("a0", "2s", GOOD_RETRY), False),
    # §10: per-try time times attempts plus backoff exceeds the timeout
    "fit_per_try_times_attempts": (svc("a1", "1s", "retry 2 per-try 400ms budget 20%"), True),
    "fit_plus_exponential_backoff": (svc("a2", "1s", "retry 2 per-try 300ms backoff 100ms..1s budget 20%"), True),
    "fit_plus_constant_backoff": (svc("a3", "1s", "retry 2 per-try 300ms backoff 200ms budget 20%"), True),
    "fit_per_try_above_timeout": (svc("a4", "1s", "retry 1 per-try 2s budget 20%"), True),
    # §10: no timeout below the built-in default (15s)
    "timeout_missing": (svc("a5", "2s", GOOD_RETRY).replace("    timeout 2s\n", ""), True),
    "timeout_15s": (svc("a6", "15s", GOOD_RETRY), True),
    "timeout_20s": (svc("a7", "20s", GOOD_RETRY), True),
    "timeout_1m": (svc("a8", "1m", GOOD_RETRY), True),
    "timeout_from_defaults": (
        "defaults {\n    timeout 2s\n}\n" + svc("a9", "2s", GOOD_RETRY).replace("    timeout 2s\n", ""),
        False,
    ),
    # §10: no retry budget
    "no_budget": (svc("a10", "2s", GOOD_RETRY.replace(" budget 20%", "")), True),
}


SCENARIOS["single"] = (
    {f"{n}.riprap": text for n, (text, _) in SINGLE_FILE_CASES.items()},
    ["check", *[f"{n}.riprap" for n in SINGLE_FILE_CASES]],
)


@pytest.fixture(scope="module")
def single_file_run(mesh):
    return mesh["single"]


@pytest.mark.parametrize("case", list(SINGLE_FILE_CASES))
def test_s10_single_file_warnings(single_file_run, case):
    # §10: in one file, warn when retries can never all run within the timeout, and when a
    # service has no timeout below the built-in default or no retry budget; §8: warnings only
    # -> exit 0 (that exit code is asserted in test_cli_contract)
    res = single_file_run
    mine = [d for d in parse_diags(res.text) if Path(d.path).name == f"{case}.riprap"]
    assert not [d for d in mine if d.sev == "error"], res.text
    expect_warning = SINGLE_FILE_CASES[case][1]
    if expect_warning:
        assert mine and all(d.sev == "warning" for d in mine), res.text
    else:
        assert not mine, res.text
    if case == "no_budget":
        assert any("budget" in d.full.lower() for d in mine), res.text


SHARD_CASES = {
    # the only retries are a shard's, and they have no budget
    "shard_retry_no_budget": "service s {\n    timeout 2s\n    shard by header K\n    shard a {\n"
    "        endpoint http://127.0.0.1:9001\n        retry 2 per-try 300ms backoff 100ms\n    }\n}\n",
    # the service says 2s, but its only shard overrides it with 30s
    "shard_timeout_30s": "service s {\n    timeout 2s\n    shard by header K\n    shard a {\n"
    "        endpoint http://127.0.0.1:9001\n        timeout 30s\n    }\n}\n",
}


SCENARIOS["shards"] = (
    {f"{n}.riprap": text for n, text in SHARD_CASES.items()},
    ["check", *[f"{n}.riprap" for n in SHARD_CASES]],
)


@pytest.fixture(scope="module")
def shard_run(mesh):
    return mesh["shards"]


@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_s10_single_file_warnings_see_shard_policies(shard_run, case):
    # §5: a shard's policy statements override the service's for that shard; §10: warn when a
    # service has no timeout below the built-in default or no retry budget
    mine = [d for d in warnings(shard_run) if Path(d.path).name == f"{case}.riprap"]
    assert mine, shard_run.text


def test_s8_s10_warnings_reported_alongside_errors(mesh):
    res = mesh["warn_and_error"]
    assert errors(res)
    assert warnings(res), res.text


ONE_FILE_GROUP.update(
    group_checks(
        SCENARIOS,
        ["fb_cycle", "fb_self", "fb_chain", "fb_cycle_and_error", "warn_and_error", "single", "shards"],
        "one_file",
    )
)
