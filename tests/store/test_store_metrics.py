"""The store's metrics: `riprap_store_up` and `riprap_store_errors_total{kind}`."""

from __future__ import annotations

from policies.store import ERROR_KINDS
from sidecar.metrics import STORE_ERROR_KINDS, SidecarMetrics


def test_error_kinds_match_the_store() -> None:
    assert STORE_ERROR_KINDS == ERROR_KINDS


def test_no_store_no_samples() -> None:
    text = SidecarMetrics().render()[0].decode()
    assert "# TYPE riprap_store_up gauge" in text
    assert "\nriprap_store_up " not in text
    assert "riprap_store_errors_total{" not in text


def test_store_up_down_and_errors_by_kind() -> None:
    m = SidecarMetrics()
    m.store_source = lambda: (True, {})
    text = m.render()[0].decode()
    assert "\nriprap_store_up 1.0\n" in text
    for kind in ERROR_KINDS:
        assert f'riprap_store_errors_total{{kind="{kind}"}} 0.0' in text
    m.store_source = lambda: (False, {"timeout": 3, "connection": 1})
    text = m.render()[0].decode()
    assert "\nriprap_store_up 0.0\n" in text
    assert 'riprap_store_errors_total{kind="timeout"} 3.0' in text
    assert 'riprap_store_errors_total{kind="connection"} 1.0' in text
