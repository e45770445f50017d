"""RP408: a failover tier that nothing can ever switch to."""

from __future__ import annotations

import pytest

from dsl.analysis import analyse
from dsl.compiler import compile_source

BASE = "service a {{\n    timeout 2s\n    endpoint http://127.0.0.1:9001\n    failover http://127.0.0.1:9101\n{extra}}}\n"


def _codes(extra: str) -> list[tuple[str, int, int]]:
    unit = compile_source(BASE.format(extra=extra), "f.riprap")
    assert unit.plan is not None
    return [(d.code, d.span.line, d.span.col) for d in analyse([unit]) if d.span is not None]


def test_failover_without_health_outlier_or_retry_is_flagged_at_the_service() -> None:
    assert ("RP408", 1, 1) in _codes("")


@pytest.mark.parametrize("extra", [
    "    health GET /healthz\n",
    "    outlier failures 3\n",
    "    retry 1 on connect-failure budget 20%\n",
])
def test_any_way_to_find_a_broken_primary_silences_it(extra: str) -> None:
    assert "RP408" not in [c for c, _, _ in _codes(extra)]


def test_a_looked_up_primary_can_empty_itself_so_its_failover_is_reachable() -> None:
    # section 5: an answer with no address empties a `resolve` line; an empty tier has no
    # endpoint left to be healthy, so the next tier takes the calls
    src = ("service a {\n    timeout 2s\n    endpoint http://pay.internal:9001 resolve\n"
           "    failover http://127.0.0.1:9101\n}\n")
    unit = compile_source(src, "f.riprap")
    assert unit.plan is not None
    assert "RP408" not in [d.code for d in analyse([unit])]
