"""Supervisor pieces that need no process: backoff arithmetic, snapshot."""

from __future__ import annotations

from dsl.plan import SuperviseSpec
from sidecar.metrics import SidecarMetrics
from sidecar.supervisor import Supervisor


def test_backoff_doubles_from_base_up_to_max() -> None:
    sup = Supervisor("app", SuperviseSpec(run="true", restart_base=1.0, restart_max=30.0),
                     SidecarMetrics())
    waits = []
    for n in range(1, 8):
        sup.consecutive = n
        waits.append(sup.backoff())
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_snapshot_before_start() -> None:
    sup = Supervisor("app", SuperviseSpec(run="sleep 1"), SidecarMetrics())
    snap = sup.snapshot()
    assert snap["running"] is False and snap["restarts"] == 0 and snap["command"] == "sleep 1"
