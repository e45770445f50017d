"""`riprap demo`: a short real run reaches its summary, riprap keeps the checkout up while
the baseline fails, and every process the demo started is gone afterwards (also after
Ctrl-C). Plus the pure pieces: schedule, statistics, port layout, report."""

from __future__ import annotations

import json
import os
import re
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.demo import chaos, layout, stats
from sidecar.demo.report import write as write_report
from sidecar.demo.summary import summarise
from sidecar.demo.sidecar_view import SidecarView, ejected_endpoints, parse_metrics

RIPRAP = [sys.executable, "-c", "import sys; from dsl.cli import main; sys.exit(main(sys.argv[1:]))"]


def _free_offset() -> int:
    """A port offset whose whole demo range is free right now."""
    rng = random.Random(os.getpid())
    for _ in range(50):
        off = rng.randrange(20, 280) * 50  # ports stay below the ephemeral range (32768+)
        lay = layout.Layout(layout.find_policy(), off)
        if all(layout.port_free(p) for p in lay.all_ports()):
            return off
    pytest.skip("no free port range for the demo")


def _demo_processes(off: int) -> list[str]:
    """Processes whose command line names one of this demo's ports (or its temp policy)."""
    lay = layout.Layout(layout.find_policy(), off)
    marks = [f"127.0.0.1:{p}" for p in lay.all_ports()] + [f"--port {p}" for p in lay.all_ports()]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(m in cmd for m in marks):
            found.append(f"{entry.name}: {cmd}")
    return found


@pytest.mark.slow
def test_short_demo_reaches_its_summary_and_cleans_up(tmp_path: Path) -> None:
    off = _free_offset()
    out_json, out_html = tmp_path / "demo.json", tmp_path / "demo.html"
    proc = subprocess.run(
        RIPRAP + ["demo", "--duration", "12", "--port-offset", str(off), "--json",
                  str(out_json), "--report", str(out_html)],
        capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checkout: the same traffic and faults" in proc.stdout
    assert "What saved the calls" in proc.stdout
    assert "step 5/6" in proc.stdout or "kill the checkout" in proc.stdout  # live lines, chaos
    doc = json.loads(out_json.read_text())
    rp, bl = doc["targets"]["riprap"], doc["targets"]["baseline"]
    assert rp["calls"] >= 250 and bl["calls"] == rp["calls"]
    assert rp["success"] >= 90.0, doc["failures"]
    assert bl["success"] <= rp["success"] - 25.0, (rp["success"], bl["success"])
    assert doc["restarts"] >= 1  # the supervisor brought the killed checkout back
    assert doc["mechanisms"]["payment_failover"] + doc["mechanisms"]["payment_retries"] > 0
    assert doc["survivors"] == []
    for pid in doc["processes"]:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert _demo_processes(off) == []
    page = out_html.read_text()
    assert page.count("<svg") == 2 and "<script" not in page
    assert "src=" not in page  # nothing fetched: no network, no CDN
    lay = layout.Layout(layout.find_policy(), off)
    dashboard = f"http://127.0.0.1:{lay.admin}/"
    assert re.findall(r'href="([^"]*)"', page) == [dashboard]  # the only link: the live view
    assert f"dashboard: {dashboard}" in proc.stdout


@pytest.mark.slow
def test_ctrl_c_stops_every_process() -> None:
    off = _free_offset()
    proc = subprocess.Popen(RIPRAP + ["demo", "--duration", "30", "--port-offset", str(off)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:  # wait for the first live line: all is running
            line = proc.stdout.readline()
            if line.startswith("[") or not line:
                break
        assert _demo_processes(off), "the demo should be running"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "stopped every process" in err
    time.sleep(0.2)
    assert _demo_processes(off) == []


@pytest.mark.slow
def test_dashboard_flag_holds_the_demo_up_until_ctrl_c() -> None:
    import httpx

    off = _free_offset()
    lay = layout.Layout(layout.find_policy(), off)
    proc = subprocess.Popen(RIPRAP + ["demo", "--duration", "10", "--port-offset", str(off),
                                      "--dashboard", "--plain"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        held = False
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("holding the demo up"):
                held = True
                break
        assert held, "the demo never said it holds for the dashboard"
        admin = f"http://127.0.0.1:{lay.admin}"
        with httpx.Client(trust_env=False, timeout=5) as client:
            assert client.get(admin + "/").status_code == 200
            names = {s["name"] for s in client.get(admin + "/dashboard.json").json()["services"]}
            assert {"payments", "inventory", "recommendations"} <= names
            time.sleep(1.5)  # still up after the schedule ended
            assert client.get(admin + "/readyz").status_code == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "What saved the calls" in out
    assert _demo_processes(off) == []


def test_busy_port_is_a_clear_error() -> None:
    import socket

    off = _free_offset()
    lay = layout.Layout(layout.find_policy(), off)
    with socket.socket() as s:
        s.bind(("127.0.0.1", lay.admin))
        s.listen()
        proc = subprocess.run(RIPRAP + ["demo", "--duration", "10", "--port-offset", str(off)],
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert f"127.0.0.1:{lay.admin}" in proc.stderr and "--port-offset" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_port_offset_rewrites_a_copy(tmp_path: Path) -> None:
    policy = layout.find_policy()
    original = policy.read_text()
    lay = layout.prepare(policy, 1000, tmp_path)
    assert lay.policy != policy and policy.read_text() == original
    assert layout.policy_ports(lay.policy) == {p + 1000 for p in layout.policy_ports(policy)}
    assert (lay.policy.parent / "fallbacks" / "recommendations.json").is_file()
    # every port the demo uses is named by the policy, or is the demo's own
    own = {lay.baseline} | {u.control_port for u in lay.upstreams}
    assert set(lay.all_ports()) - own == layout.policy_ports(lay.policy)


def test_the_demo_policy_compiles_without_warnings() -> None:
    proc = subprocess.run(RIPRAP + ["check", "--strict", str(layout.find_policy())],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning" not in (proc.stdout + proc.stderr).replace("0 warnings", "")


def test_schedule_spreads_six_steps_and_heals_last() -> None:
    steps = chaos.schedule(60)
    assert [s.at for s in steps] == [8.0, 16.0, 24.0, 32.0, 40.0, 48.0]
    assert steps[-1].key == "heal"
    assert chaos.step_at(steps, 3.0) is None
    assert chaos.step_at(steps, 17.0) is steps[1]
    with pytest.raises(ValueError, match="heal"):
        chaos.Chaos(steps, {s.key: None for s in steps[:-1]})  # type: ignore[misc]


def test_percentiles_and_rates() -> None:
    assert stats.percentile([], 99) is None
    assert stats.percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert stats.percentile([float(i) for i in range(1, 1001)], 99.9) == 999.0
    calls = [stats.Call("riprap", 0.1, 10.0, 200, deps={"payments": {"status": 200, "ms": 4,
                                                                     "attempts": "2"}}),
             stats.Call("riprap", 1.2, 20.0, 0, error="refused"),
             stats.Call("baseline", 0.5, 5.0, 503, deps={"payments": {"status": 503, "ms": 1}})]
    r = stats.rates(calls)
    assert r[("riprap", "checkout")].success == 50.0
    assert r[("baseline", "payments")].success == 0.0
    m = stats.mechanisms(calls)
    assert (m.payment_retries, m.checkout_refused) == (1, 1)
    assert stats.per_second(calls, "riprap", 2.0) == [(0.0, 100.0, 10.0), (1.0, 0.0, 20.0)]


def test_metrics_parsing_and_report(tmp_path: Path) -> None:
    text = "\n".join([
        "# TYPE riprap_retries counter", 'riprap_retries_total{service="payments"} 4.0',
        "# TYPE riprap_breaker_state gauge",
        'riprap_breaker_state{service="inventory",shard="b"} 2.0',
        "# TYPE riprap_fallbacks counter",
        'riprap_fallbacks_total{service="inventory",kind="stale"} 7.0', ""])
    view = parse_metrics(text)
    assert view.retries == {"payments": 4.0}
    assert view.breakers == {"inventory/b": "open"}
    assert view.fallbacks == {("inventory", "stale"): 7.0}
    steps = chaos.schedule(10)
    calls = [stats.Call(t, i / 10, 3.0, 200 if t == "riprap" or i % 2 else 503, deps={})
             for i in range(100) for t in ("riprap", "baseline")]
    doc = summarise(calls, steps, 10.0, view, 1, [1, 2])
    assert doc["targets"]["riprap"]["success"] == 100.0
    assert doc["targets"]["baseline"]["success"] == 50.0
    assert len(doc["phases"]) == 7
    out = tmp_path / "r.html"
    write_report(str(out), calls, steps, 10.0, doc)
    page = out.read_text()
    assert page.count("<svg") == 2 and "stroke-dasharray" in page and "<script" not in page
    assert SidecarView().error is None
    state = {"services": {
        "payments": {"endpoints": [{"url": "http://a", "ejected": True},
                                   {"url": "http://b", "ejected": False}]},
        "inventory": {"shards": {"b": {"endpoints": [{"url": "http://c", "ejected": True}]}}}}}
    assert ejected_endpoints(state) == ["inventory http://c", "payments http://a"]
    assert ejected_endpoints({"unexpected": 1}) == []
