"""Hot reload on a real temporary directory, through a real sidecar process.

Covers: an editor's rename-save, a broken file then a fixed one (/plan `last_error`,
metrics), SIGHUP, state carried over for unchanged services, a watched fallback file,
calls in flight finishing on their plan, and a Kubernetes ConfigMap `..data` symlink swap.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from riprap_testing.faults import FaultServer

pytestmark = pytest.mark.slow

BASE = """\
app reloading

service api {{
    endpoint {ok}
}}

service fb {{
    endpoint {bad}
    fallback status 200 file "fb.json"
}}

service guarded {{
    endpoint {bad}
    breaker failures 2 open 60s
}}
{extra}
"""


def save_by_rename(path: Path, text: str) -> None:
    """What vim/VS Code/JetBrains do: write a temporary file, rename it over the original."""
    tmp = path.with_name(f".{path.name}.tmp{time.monotonic_ns()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def ups(upstreams: Any) -> dict[str, FaultServer]:
    servers = {n: upstreams(n) for n in ("ok", "bad", "new")}
    servers["bad"].set(error_rate=1.0)
    return servers


@pytest.fixture(scope="module")
def setup(module_tmp: Path, ups: dict[str, FaultServer], sidecar_proc: Any) -> Iterator[Any]:
    d = module_tmp / "edit"
    d.mkdir()
    (d / "fb.json").write_text('{"v": 1}')
    policy = d / "policy.riprap"

    def render(extra: str = "") -> str:
        return BASE.format(ok=ups["ok"].url, bad=ups["bad"].url, extra=extra)

    policy.write_text(render())
    proc = sidecar_proc(policy, "--grace", "0").start()
    proc.render = render  # type: ignore[attr-defined]
    yield proc
    assert proc.stop() == 0, proc.logs()


def new_service(url: str, name: str = "fresh") -> str:
    return f"\nservice {name} {{\n    endpoint {url}\n}}\n"


def wait_hash_change(proc: Any, old: str, timeout: float = 1.0) -> float:
    t = time.monotonic()
    proc.wait_for(lambda: proc.plan()["hash"] != old, timeout=timeout, what="the new plan")
    return time.monotonic() - t


def test_rename_save_takes_effect_within_a_second(setup: Any, ups: dict[str, FaultServer]) -> None:
    old = setup.plan()["hash"]
    assert setup.client.get("/fresh/x").status_code == 404
    save_by_rename(setup.policy, setup.render(new_service(ups["new"].url)))
    wait_hash_change(setup, old, timeout=1.0)
    r = setup.client.get("/fresh/x")
    assert r.status_code == 200 and r.json()["server"] == "new"
    assert setup.metric("riprap_reloads_total", result="ok") >= 1


def test_broken_file_keeps_the_plan_then_a_fixed_one_clears_the_error(
        setup: Any, ups: dict[str, FaultServer]) -> None:
    before = setup.plan()
    errors = setup.metric("riprap_reloads_total", result="error")
    save_by_rename(setup.policy, setup.render("\nservice oops {\n    retry lots\n}\n"))
    setup.wait_for(lambda: setup.plan()["last_error"] is not None, timeout=2.0,
                   what="the failed reload to show at /plan")
    doc = setup.plan()
    assert doc["hash"] == before["hash"]
    assert doc["last_error"][0]["severity"] == "error" and doc["last_error"][0]["line"]
    assert setup.metric("riprap_reloads_total", result="error") == errors + 1
    assert setup.client.get("/api/still-served").status_code == 200
    assert "error[" in setup.err_path.read_text()  # the diagnostics are logged
    save_by_rename(setup.policy, setup.render(new_service(ups["new"].url)))
    setup.wait_for(lambda: setup.plan()["last_error"] is None, timeout=2.0,
                   what="a good reload to clear last_error")


def test_sighup_reloads(setup: Any) -> None:
    unchanged = setup.metric("riprap_reloads_total", result="unchanged")
    setup.send(signal.SIGHUP)
    setup.wait_for(lambda: setup.metric("riprap_reloads_total", result="unchanged") == unchanged + 1,
                   what="the SIGHUP reload")


def test_state_of_unchanged_services_carries_over(setup: Any, ups: dict[str, FaultServer]) -> None:
    for _ in range(2):
        assert setup.client.get("/guarded/g").status_code == 503
    assert setup.client.get("/guarded/g").headers.get("x-riprap-reason") == "breaker-open"
    old = setup.plan()["hash"]
    save_by_rename(setup.policy, setup.render(new_service(ups["new"].url) +
                                              new_service(ups["new"].url, "another")))
    wait_hash_change(setup, old)
    hits = ups["bad"].hits
    r = setup.client.get("/guarded/g")
    assert r.headers.get("x-riprap-reason") == "breaker-open"  # still open: state kept
    assert ups["bad"].hits == hits


def test_a_watched_fallback_file_reloads(setup: Any) -> None:
    r = setup.client.get("/fb/x")
    assert r.headers["x-riprap-fallback"] == "static" and r.json() == {"v": 1}
    old = setup.plan()["hash"]
    save_by_rename(setup.policy.with_name("fb.json"), '{"v": 2}')
    wait_hash_change(setup, old)
    assert setup.client.get("/fb/x").json() == {"v": 2}


def test_calls_in_flight_finish_on_the_plan_they_started_with(setup: Any, ups: dict[str, FaultServer]) -> None:
    results: list[tuple[int, str]] = []

    def slow_call() -> None:
        r = setup.client.get("/fresh/slow?delay=0.8")
        results.append((r.status_code, r.json().get("server", "")))

    t = threading.Thread(target=slow_call)
    t.start()
    setup.wait_for(lambda: ups["new"].in_flight == 1, what="the call to be in flight")
    old = setup.plan()["hash"]
    save_by_rename(setup.policy, setup.render())  # `fresh` is removed from the plan
    wait_hash_change(setup, old)
    t.join(10)
    assert results == [(200, "new")]
    assert setup.client.get("/fresh/x").status_code == 404


def test_configmap_symlink_swap(module_tmp: Path, ups: dict[str, FaultServer], sidecar_proc: Any) -> None:
    d = module_tmp / "configmap"
    d.mkdir()

    def publish(version: str, text: str) -> None:
        """Kubernetes' AtomicWriter: a new timestamped dir, then `..data` re-pointed by rename."""
        target = d / f"..{version}"
        target.mkdir()
        (target / "policy.riprap").write_text(text)
        tmp_link = d / "..data_tmp"
        tmp_link.symlink_to(target.name)
        os.replace(tmp_link, d / "..data")

    first = f"app cm\n\nservice api {{\n    endpoint {ups['ok'].url}\n}}\n"
    publish("2026_01", first)
    (d / "policy.riprap").symlink_to("..data/policy.riprap")
    riprap = Path(os.sys.executable).with_name("riprap")
    command = [str(riprap), "run"] if riprap.exists() else None
    proc = sidecar_proc(d / "policy.riprap", "--grace", "0", command=command).start()
    try:
        old = proc.plan()["hash"]
        publish("2026_02", first + new_service(ups["new"].url))
        wait_hash_change(proc, old, timeout=1.0)
        assert proc.client.get("/fresh/x").json()["server"] == "new"
    finally:
        assert proc.stop() == 0, proc.logs()


def test_a_symlinked_policy_reloads_when_its_target_is_edited(
        module_tmp: Path, ups: dict[str, FaultServer], sidecar_proc: Any) -> None:
    real, links = module_tmp / "real", module_tmp / "links"
    real.mkdir()
    links.mkdir()
    first = f"app linked\n\nservice api {{\n    endpoint {ups['ok'].url}\n}}\n"
    (real / "policy.riprap").write_text(first)
    (links / "policy.riprap").symlink_to(real / "policy.riprap")
    proc = sidecar_proc(links / "policy.riprap", "--grace", "0").start()
    try:
        old = proc.plan()["hash"]
        save_by_rename(real / "policy.riprap", first + new_service(ups["new"].url))
        wait_hash_change(proc, old, timeout=1.0)
        assert proc.client.get("/fresh/x").json()["server"] == "new"
    finally:
        assert proc.stop() == 0, proc.logs()
