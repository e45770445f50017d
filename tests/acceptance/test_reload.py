"""Acceptance: hot reload, signals and supervision.

A real `riprap run` on loopback with this file's own small policy, next to its tests
(written from /work/shared/language.md; each test cites its contract section). The
sidecar comes from the `run_sidecar` fixture (conftest.py), the upstreams from `ups`."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from acc_kit import (
    RunSidecar,
    Sidecar,
    Upstream,
    free_port,
    reason,
    uid,
    wait_for,
)
from engine_differences import ENVOY_DIFFERENCES

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
]


RELOAD_BASE = """\
app rel
listen 127.0.0.1:{port}
admin 127.0.0.1:{admin}

service one {{
    endpoint {dead}
    fallback status 200 file "fb.json"
}}
{extra}
"""


@pytest.fixture(scope="module")
def rel(tmp_path_factory: pytest.TempPathFactory, ups: dict[str, Any],
        run_sidecar: RunSidecar) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("acc_reload")
    port, admin = free_port(), free_port()
    fmt = {"port": port, "admin": admin, "dead": f"http://127.0.0.1:{ups['DEAD']}"}
    (d / "fb.json").write_text('{"v": 1}', encoding="utf-8")
    policy = d / "rel.riprap"
    policy.write_text(RELOAD_BASE.format(extra="", **fmt), encoding="utf-8")
    # addresses from the file itself; run from elsewhere: the fallback file's path is
    # relative to the policy file (section 4), not to the working directory
    sc = run_sidecar(policy, port=port, admin=admin, cwd=d.parent)
    try:
        yield {"sc": sc, "dir": d, "policy": policy, "fmt": fmt, "A": ups["A"]}
    finally:
        sc.stop()


def save_by_rename(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".swp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def test_reload_named_file_within_1s(rel: dict[str, Any]) -> None:
    # contract §9 Hot reload: "a saved change ... to a file it names, takes effect within 1 s"
    sc = rel["sc"]
    r = sc.get("/one/x")
    assert r.json() == {"v": 1} and r.headers.get("x-riprap-fallback") == "static"
    time.sleep(0.05)
    (rel["dir"] / "fb.json").write_text('{"v": 2}', encoding="utf-8")
    t = time.monotonic()
    ok = wait_for(lambda: sc.get("/one/x").json() == {"v": 2}, 3)
    took = time.monotonic() - t
    assert ok, "fallback file change never took effect"
    assert took <= 1.2, f"took {took:.2f}s"


def test_reload_policy_saved_by_rename_within_1s(rel: dict[str, Any]) -> None:
    # contract §9 Hot reload: "within 1 s"; "Editors that save by rename ... are handled"
    sc, A = rel["sc"], rel["A"]
    extra = f"service two {{\n    endpoint {A.url}\n}}\n"
    before = sc.admin.get("/plan").json()
    assert sc.get("/two/x").status_code == 404
    save_by_rename(rel["policy"], RELOAD_BASE.format(extra=extra, **rel["fmt"]))
    t = time.monotonic()
    ok = wait_for(lambda: sc.get(f"/two/x/{uid()}").status_code == 200, 3)
    took = time.monotonic() - t
    assert ok, "new service never routed"
    assert took <= 1.2, f"took {took:.2f}s"
    after = sc.admin.get("/plan").json()
    assert after["hash"] != before["hash"] and "two" in after["plan"]["services"]
    assert after["last_error"] is None


def _reload_error_count(sc: Sidecar) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(sc.admin.get("/metrics").text):
        if "reload" not in fam.name:
            continue
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            if any(v in ("error", "failed", "failure") for v in s.labels.values()) or \
                    "error" in s.name or "fail" in s.name:
                total += s.value
    return total


def test_broken_change_keeps_plan_and_reports_then_clears(rel: dict[str, Any]) -> None:
    # contract §9: "A change that does not compile leaves the running plan in force, logs ..., shows them at /plan and counts them in the metrics"; last_error "null again after a successful one"
    sc, A = rel["sc"], rel["A"]
    extra = f"service two {{\n    endpoint {A.url}\n}}\n"
    good = RELOAD_BASE.format(extra=extra, **rel["fmt"])
    save_by_rename(rel["policy"], good)
    assert wait_for(lambda: sc.get(f"/two/x/{uid()}").status_code == 200, 3)
    before = sc.admin.get("/plan").json()
    errs0 = _reload_error_count(sc)
    rel["policy"].write_text(good + "service broken {\n    retry lots\n    endpoint nowhere\n",
                             encoding="utf-8")
    doc = wait_for(lambda: (lambda d: d if d["last_error"] else None)(
        sc.admin.get("/plan").json()), 3)
    assert doc is not None, "last_error never shown at /plan"
    assert doc["hash"] == before["hash"]  # the running plan stays in force
    assert "lots" in json.dumps(doc["last_error"]) or "retry" in json.dumps(doc["last_error"])
    assert "rel.riprap" in sc.logs(), "diagnostics not logged"
    assert sc.get(f"/two/x/{uid()}").status_code == 200
    assert sc.admin.get("/readyz").status_code == 200
    assert _reload_error_count(sc) > errs0, "failed reload not counted in the metrics"
    extra3 = extra + f"service three {{\n    endpoint {A.url}\n}}\n"
    rel["policy"].write_text(RELOAD_BASE.format(extra=extra3, **rel["fmt"]), encoding="utf-8")
    doc = wait_for(lambda: (lambda d: d if d["last_error"] is None else None)(
        sc.admin.get("/plan").json()), 3)
    assert doc is not None, "last_error not null again after a fix"
    assert "three" in doc["plan"]["services"]
    assert wait_for(lambda: sc.get(f"/three/x/{uid()}").status_code == 200, 2)


def test_reload_carries_over_limiter_state(rel: dict[str, Any]) -> None:
    """Section 9: state of services that did not change (buckets) carries over."""
    sc, A = rel["sc"], rel["A"]
    lim = (f"service lim {{\n    limit 1/m burst 1\n    endpoint {A.url}\n}}\n"
           f"service brk {{\n    breaker failures 1 open 30s\n    endpoint {A.url}\n}}\n")
    save_by_rename(rel["policy"], RELOAD_BASE.format(extra=lim, **rel["fmt"]))
    assert wait_for(lambda: sc.get(f"/lim/x/{uid()}").status_code in (200, 429), 3)
    r = sc.get(f"/lim/x/{uid()}")
    assert r.status_code == 429  # the bucket (burst 1) is empty now
    assert sc.get(f"/brk/s/500/{uid()}").status_code == 500
    assert reason(sc.get(f"/brk/x/{uid()}")) == "breaker-open"
    other = lim + f"service other {{\n    endpoint {A.url}\n}}\n"
    save_by_rename(rel["policy"], RELOAD_BASE.format(extra=other, **rel["fmt"]))
    assert wait_for(lambda: sc.get(f"/other/x/{uid()}").status_code == 200, 3)
    r = sc.get(f"/lim/x/{uid()}")
    assert r.status_code == 429 and reason(r) == "rate-limited"
    assert reason(sc.get(f"/brk/x/{uid()}")) == "breaker-open"  # the breaker too


APP_PY = """\
import os, signal, sys, time
log = sys.argv[1]
with open(log, "a") as f:
    f.write(f"start {os.getpid()} {time.time()}\\n")
n = sum(1 for line in open(log) if line.startswith("start"))
if n < 3:
    time.sleep(0.1)
    sys.exit(3 if n == 1 else 0)  # a crash, then a clean exit: both are restarted
def bye(*_):
    with open(log, "a") as f:
        f.write(f"stopped {os.getpid()}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
while True:
    time.sleep(0.05)
"""


SUP_POLICY = """\
app sup {{
    run "{python} {app} {log}"
    restart backoff 200ms..2s
}}
listen 127.0.0.1:{port}
admin 127.0.0.1:{admin}

service up {{
    endpoint {A}
}}
{extra}
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_supervision_sighup_and_sigterm(tmp_path: Path, ups: dict[str, Any],
                                       run_sidecar: RunSidecar) -> None:
    A = ups["A"]
    real = tmp_path / "real"
    real.mkdir()
    linkdir = tmp_path / "conf"
    linkdir.mkdir()
    app, log = tmp_path / "app.py", tmp_path / "app.log"
    app.write_text(APP_PY, encoding="utf-8")
    port, admin = free_port(), free_port()
    fmt = {"python": sys.executable, "app": app, "log": log, "port": port, "admin": admin,
           "A": A.url}
    target = real / "sup.riprap"
    target.write_text(SUP_POLICY.format(extra="", **fmt), encoding="utf-8")
    link = linkdir / "sup.riprap"
    link.symlink_to(target)
    sc = run_sidecar(link, port=port, admin=admin)
    try:
        # section 6: the app is started, and restarted each time it exits
        # (each start is a Python interpreter: the bound allows for a loaded machine)
        starts = wait_for(lambda: (lambda ls: ls if len(ls) >= 3 else None)(
            [ln for ln in log.read_text().splitlines() if ln.startswith("start")]
            if log.exists() else []), 20)
        assert starts, f"app not restarted: {log.read_text() if log.exists() else ''}"
        pids = {int(ln.split()[1]) for ln in starts}
        assert len(pids) == 3
        last = int(starts[-1].split()[1])
        t = [float(ln.split()[2]) for ln in starts]
        # exponential backoff between restarts: 200ms, then 400ms, as the sidecar says, and
        # at least that between the starts (plus the app's 0.1 s; a slow interpreter start
        # only adds to either gap, so these lower bounds hold under any load)
        delays = re.findall(r"app sup: restarting \(exit, exit code \d+\) in ([0-9.]+)s", sc.logs())
        assert [float(d) for d in delays[:2]] == [0.2, 0.4], sc.logs()
        assert t[1] - t[0] >= 0.3 and t[2] - t[1] >= 0.5, t
        time.sleep(0.3)
        assert _alive(last)

        # section 9: SIGHUP reloads (the file changed where no watcher of its directory sees)
        extra = f"service added {{\n    endpoint {A.url}\n}}\n"
        target.write_text(SUP_POLICY.format(extra=extra, **fmt), encoding="utf-8")
        sc.signal(signal.SIGHUP)
        assert wait_for(lambda: sc.get(f"/added/x/{uid()}").status_code == 200, 2), \
            "SIGHUP did not reload"
        assert sc.proc is not None and sc.proc.poll() is None

        # section 9: SIGTERM: readiness 503, new calls still served, in-flight drain, exit 0
        i = uid()
        out: dict[str, Any] = {}
        cli = httpx.Client(base_url=sc.url, trust_env=False, timeout=10)

        def inflight() -> None:
            out["r"] = cli.get(f"/up/sleep/1.2/{i}")

        th = threading.Thread(target=inflight)
        th.start()
        assert wait_for(lambda: A.hits(i), 3)
        sc.signal(signal.SIGTERM)
        assert wait_for(lambda: sc.admin.get("/readyz").status_code == 503, 1.0), \
            "readiness did not turn 503"
        r = sc.get(f"/up/x/{uid()}")
        assert r.status_code == 200  # the grace period still serves new calls
        th.join(10)
        cli.close()
        assert out["r"].status_code == 200, "the call in flight was not drained"
        assert sc.proc is not None
        rc = sc.proc.wait(20)
        assert rc == 0
        # section 6: the app is stopped when the sidecar stops
        assert f"stopped {last}" in log.read_text()
        assert wait_for(lambda: not _alive(last), 2)
    finally:
        sc.stop()


def test_inflight_call_finishes_on_its_plan(rel: dict[str, Any]) -> None:
    # contract §9: "Calls in flight finish on the plan they started with"
    sc, A = rel["sc"], rel["A"]
    extra = f"service gone {{\n    timeout 5s\n    endpoint {A.url}\n}}\n"
    save_by_rename(rel["policy"], RELOAD_BASE.format(extra=extra, **rel["fmt"]))
    assert wait_for(lambda: sc.get(f"/gone/x/{uid()}").status_code == 200, 3)
    i = uid()
    out: dict[str, Any] = {}
    cli = httpx.Client(base_url=sc.url, trust_env=False, timeout=10)
    th = threading.Thread(target=lambda: out.setdefault("r", cli.get(f"/gone/sleep/1.2/{i}")))
    th.start()
    try:
        assert wait_for(lambda: A.hits(i), 3)
        save_by_rename(rel["policy"], RELOAD_BASE.format(extra="", **rel["fmt"]))
        assert wait_for(lambda: sc.get(f"/gone/x/{uid()}").status_code == 404, 2)
    finally:
        th.join(5)
        cli.close()
    assert out["r"].status_code == 200 and out["r"].json()["upstream"] == "A"


def test_kubernetes_configmap_symlink_swap(tmp_path: Path, ups: dict[str, Any],
                                           run_sidecar: RunSidecar) -> None:
    A = ups["A"]
    port, admin = free_port(), free_port()
    v1, v2 = tmp_path / "..2026_11_27_v1", tmp_path / "..2026_11_27_v2"
    six = Upstream("SIX", host="::1")  # section 2: [IPv6] addresses, in an endpoint URL too
    body = ("service k8s {{\n    endpoint {A}\n    fallback status 200 text \"{t}\"\n}}\n"
            "service six {{\n    endpoint " + six.url + "\n}}\n"
            "service dead {{\n    endpoint http://127.0.0.1:{d}\n"
            "    fallback status 200 text \"{t}\"\n}}\n")
    for v, t in ((v1, "one"), (v2, "two")):
        v.mkdir()
        (v / "k8s.riprap").write_text(body.format(A=A.url, t=t, d=ups["DEAD"]))
    (tmp_path / "..data").symlink_to(v1.name)
    (tmp_path / "k8s.riprap").symlink_to("..data/k8s.riprap")
    # section 2: addresses may be [IPv6]:PORT
    sc = run_sidecar(tmp_path / "k8s.riprap", "--listen", f"127.0.0.1:{port}",
                     "--admin", f"[::1]:{admin}", port=port, admin=admin, admin_host="[::1]")
    try:
        assert sc.get("/dead/x").text == "one"
        assert sc.admin.get("/plan").json()["plan"]["app"] == "k8s"  # section 3: file stem
        r = sc.get(f"/six/x/{uid()}")
        assert r.status_code == 200 and r.headers["x-upstream"] == "SIX"
        tmp_link = tmp_path / "..data_tmp"
        tmp_link.symlink_to(v2.name)
        os.replace(tmp_link, tmp_path / "..data")  # the kubelet's atomic swap
        t = time.monotonic()
        assert wait_for(lambda: sc.get("/dead/x").text == "two", 3), "swap not noticed"
        assert time.monotonic() - t <= 1.2
    finally:
        sc.stop()
        six.close()


HEALTH_APP = """\
import os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
with open(sys.argv[2], "a") as f:
    f.write(f"start {os.getpid()}\\n")
seen = []
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        seen.append(1)
        ok = sys.argv[3] == "once" and len(seen) == 1
        self.send_response(200 if ok else 500)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _health_app_sidecar(run_sidecar: RunSidecar, tmp_path: Path, mode: str) -> tuple[Sidecar, Path]:
    app, log = tmp_path / "happ.py", tmp_path / "happ.log"
    app.write_text(HEALTH_APP)
    hp, port, admin = free_port(), free_port(), free_port()
    policy = tmp_path / "happ.riprap"
    policy.write_text(f"""\
app happ {{
    run "{sys.executable} {app} {hp} {log} {mode}"
    health GET http://127.0.0.1:{hp}/healthz every 100ms timeout 300ms fall 2
    restart backoff 100ms..1s
}}
service self {{
    endpoint http://127.0.0.1:{hp}
}}
""")
    sc = run_sidecar(policy, "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                     port=port, admin=admin)
    return sc, log


def _starts(log: Path) -> list[str]:
    try:
        return [ln for ln in log.read_text().splitlines() if ln.startswith("start")]
    except OSError:
        return []


def test_supervised_app_restarted_when_health_fails(tmp_path: Path, run_sidecar: RunSidecar) -> None:
    """Section 6: restarted when its health check fails `fall` times in a row."""
    sc, log = _health_app_sidecar(run_sidecar, tmp_path, "once")
    try:
        starts = wait_for(lambda: (lambda ls: ls if len(ls) >= 2 else None)(_starts(log)), 15)
        assert starts, f"not restarted on failed health: {_starts(log)}"
        first = int(starts[0].split()[1])
        assert wait_for(lambda: not _alive(first), 5), "the unhealthy app was not stopped"
    finally:
        sc.stop()
    last = int(_starts(log)[-1].split()[1])
    assert wait_for(lambda: not _alive(last), 12), "app left running after the sidecar stopped"


def test_never_healthy_app_restarted_after_fall_checks(tmp_path: Path,
                                                      run_sidecar: RunSidecar) -> None:
    # contract §6: "restarts it when ... its health check fails fall times in a row"
    sc, log = _health_app_sidecar(run_sidecar, tmp_path, "never")
    try:
        # every 100ms, fall 2: a few hundred ms after it answers its first check (the start
        # grace forgives only "nothing listening"), plus the 100ms backoff (the wait is
        # polled: the bound only matters on a loaded machine, where Python starts slowly)
        assert wait_for(lambda: len(_starts(log)) >= 2, 15.0), "not restarted"
    finally:
        sc.stop()


def test_reload_watches_a_file_named_by_a_new_plan(rel: dict[str, Any]) -> None:
    """Section 9: a file the policy names (here, named only after a reload, in another
    directory) is watched too."""
    sc, d = rel["sc"], rel["dir"]
    (d / "more").mkdir(exist_ok=True)
    (d / "more" / "other.json").write_text('{"o": 1}')
    extra = ('service fbo {\n    endpoint ' + rel["fmt"]["dead"] +
             '\n    fallback status 200 file "more/other.json"\n}\n')
    save_by_rename(rel["policy"], RELOAD_BASE.format(extra=extra, **rel["fmt"]))
    assert wait_for(lambda: sc.get("/fbo/x").json() == {"o": 1}, 3)
    time.sleep(0.1)
    (d / "more" / "other.json").write_text('{"o": 2}')
    t = time.monotonic()
    assert wait_for(lambda: sc.get("/fbo/x").json() == {"o": 2}, 3), "change not seen"
    assert time.monotonic() - t <= 1.2


def test_deleted_fallback_file_keeps_plan(rel: dict[str, Any]) -> None:
    # contract §9: "A change that does not compile leaves the running plan in force"
    sc, d = rel["sc"], rel["dir"]
    save_by_rename(rel["policy"], RELOAD_BASE.format(extra="", **rel["fmt"]))
    (d / "fb.json").write_text('{"v": 7}')
    assert wait_for(lambda: sc.get("/one/x").json() == {"v": 7}, 3)
    (d / "fb.json").unlink()
    doc = wait_for(lambda: (lambda d: d if d["last_error"] else None)(
        sc.admin.get("/plan").json()), 3)
    try:
        assert doc is not None, "a missing fallback file was not reported"
        r = sc.get("/one/x")
        assert r.status_code == 200 and r.json() == {"v": 7}  # the running plan answers
    finally:
        (d / "fb.json").write_text('{"v": 8}')
    assert wait_for(lambda: sc.admin.get("/plan").json()["last_error"] is None, 3)
    assert sc.get("/one/x").json() == {"v": 8}


def test_reload_vim_style_backup_then_write(rel: dict[str, Any]) -> None:
    """Section 9: editors that save by rename (vim: rename to a backup, write a new file)."""
    sc, A = rel["sc"], rel["A"]
    policy = rel["policy"]
    extra = f"service vim {{\n    endpoint {A.url}\n}}\n"
    os.replace(policy, policy.with_name(policy.name + "~"))
    policy.write_text(RELOAD_BASE.format(extra=extra, **rel["fmt"]), encoding="utf-8")
    t = time.monotonic()
    assert wait_for(lambda: sc.get(f"/vim/x/{uid()}").status_code == 200, 3)
    assert time.monotonic() - t <= 1.2
    assert wait_for(lambda: sc.admin.get("/plan").json()["last_error"] is None, 2)


def test_sigterm_drain_is_bounded(tmp_path: Path, ups: dict[str, Any],
                                  run_sidecar: RunSidecar) -> None:
    """Section 9 SIGTERM: "then calls in flight drain (bounded), then it exits 0": a call
    still running when the drain bound (--drain-timeout) is over does not keep the
    sidecar alive."""
    A = ups["A"]
    port, admin = free_port(), free_port()
    policy = tmp_path / "drain.riprap"
    policy.write_text(f"service up {{\n    timeout 30s\n    endpoint {A.url}\n}}\n", encoding="utf-8")
    sc = run_sidecar(policy, "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                     "--grace", "0.3", "--drain-timeout", "1", port=port, admin=admin)
    i = uid()
    out: dict[str, Any] = {}

    def long_call() -> None:
        try:
            out["r"] = httpx.get(f"{sc.url}/up/sleep/12/{i}", trust_env=False, timeout=20)
        except httpx.HTTPError as exc:
            out["error"] = exc

    th = threading.Thread(target=long_call)
    th.start()
    try:
        assert wait_for(lambda: A.hits(i), 3), "the long call never arrived"
        t = time.monotonic()
        sc.signal(signal.SIGTERM)
        assert sc.proc is not None
        rc = sc.proc.wait(10)
        took = time.monotonic() - t
        assert rc == 0
        # grace 0.3 s + drain 1 s, and the time to stop (generous: the machine is loaded)
        assert took < 6, f"exited after {took:.1f}s: the drain was not bounded"
    finally:
        th.join(15)
        sc.stop()
    # the call that outlived the drain was cut, not answered by the upstream
    assert "error" in out or out["r"].status_code >= 500


def test_reloads_under_load_fail_no_call(rel: dict[str, Any]) -> None:
    """Sections 9 and 11: a reload changes the plan without failing calls, the calls in
    flight included; on the Envoy engine, without restarting Envoy. Calls run all through
    reloads that add a service, add a limit, change the called service itself, and remove
    the others again."""
    sc, A = rel["sc"], rel["A"]
    steady = f"service steady {{\n    timeout 5s\n    endpoint {A.url}\n}}\n"
    save_by_rename(rel["policy"], RELOAD_BASE.format(extra=steady, **rel["fmt"]))
    assert wait_for(lambda: sc.get(f"/steady/x/{uid()}").status_code == 200, 3)
    envoy_pid = (sc.admin.get("/state").json().get("envoy") or {}).get("pid")
    assert (envoy_pid is not None) == (sc.engine == "envoy")
    stop = threading.Event()
    codes: list[int | str] = []

    def load(path: str) -> None:
        with httpx.Client(base_url=sc.url, trust_env=False, timeout=10) as cli:
            while not stop.is_set():
                try:
                    codes.append(cli.get(f"{path}/{uid()}").status_code)
                except httpx.HTTPError as exc:
                    codes.append(type(exc).__name__)

    workers = [threading.Thread(target=load, args=(p,)) for p in ("/steady/x", "/steady/sleep/0.3")]
    for w in workers:
        w.start()
    try:
        steps = [
            steady + f"service extra {{\n    endpoint {A.url}\n}}\n",
            steady + f"service extra {{\n    limit 100/s\n    endpoint {A.url}\n}}\n",
            steady.replace("timeout 5s", "timeout 6s") +
            f"service extra {{\n    limit 50/s\n    endpoint {A.url}\n}}\n",
            steady.replace("timeout 5s", "timeout 6s"),
        ]
        for n, extra in enumerate(steps):
            before = sc.admin.get("/plan").json()["hash"]
            save_by_rename(rel["policy"], RELOAD_BASE.format(extra=extra, **rel["fmt"]))
            assert wait_for(lambda b=before: sc.admin.get("/plan").json()["hash"] != b, 4), \
                f"reload {n} never took effect: {sc.admin.get('/plan').json()['last_error']}"
            time.sleep(0.4)  # calls keep running on the new plan
    finally:
        stop.set()
        for w in workers:
            w.join(15)
    assert codes and all(c == 200 for c in codes), [c for c in codes if c != 200][:10]
    assert len(codes) >= 10
    if sc.engine == "envoy":  # the same Envoy all along
        assert (sc.admin.get("/state").json().get("envoy") or {}).get("pid") == envoy_pid


STUBBORN_APP = """\
import os, signal, sys, time
log = sys.argv[1]
def term(*_):
    with open(log, "a") as f:
        f.write(f"term {time.time()}\\n")
signal.signal(signal.SIGTERM, term)  # and keeps running: only SIGKILL ends it
with open(log, "a") as f:
    f.write(f"start {os.getpid()}\\n")
while True:
    time.sleep(0.05)
"""


def test_app_that_ignores_sigterm_is_killed_after_10s(tmp_path: Path, ups: dict[str, Any],
                                                      run_sidecar: RunSidecar) -> None:
    """Section 6: the sidecar stops the app when it stops: SIGTERM, then SIGKILL after 10 s."""
    app, log = tmp_path / "stubborn.py", tmp_path / "stubborn.log"
    app.write_text(STUBBORN_APP, encoding="utf-8")
    port, admin = free_port(), free_port()
    policy = tmp_path / "stubborn.riprap"
    policy.write_text(f'app stubborn {{\n    run "{sys.executable} {app} {log}"\n}}\n'
                      f"service up {{\n    endpoint {ups['A'].url}\n}}\n", encoding="utf-8")
    sc = run_sidecar(policy, "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                     "--grace", "0", port=port, admin=admin)
    pid = 0
    try:
        started = wait_for(lambda: [ln for ln in log.read_text().splitlines()
                                    if ln.startswith("start")], 8)
        assert started, "the app never started"
        pid = int(started[0].split()[1])
        t = time.time()
        sc.signal(signal.SIGTERM)
        assert wait_for(lambda: "term" in log.read_text(), 5), "the app got no SIGTERM"
        assert wait_for(lambda: not _alive(pid), 16), "the app outlived SIGTERM + 10 s"
        gone = time.time() - t
        assert gone >= 9.0, f"killed after {gone:.1f}s: it had 10 s to stop by itself"
        assert sc.proc is not None and sc.proc.wait(10) == 0
    finally:
        sc.stop()
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_state_carries_over_a_reload_that_adds_retries_and_limits(rel: dict[str, Any]) -> None:
    """Section 9: "State of services ... that did not change (breakers, ejections, buckets)
    carries over" whatever else the reload adds: here the first service with retries and
    another service's limit (on Envoy these change its filters, not its listener)."""
    sc, A = rel["sc"], rel["A"]
    keep = (f"service lim {{\n    limit 1/m burst 1\n    endpoint {A.url}\n}}\n"
            f"service brk {{\n    breaker failures 1 open 30s\n    endpoint {A.url}\n}}\n")
    save_by_rename(rel["policy"], RELOAD_BASE.format(extra=keep, **rel["fmt"]))
    assert wait_for(lambda: sc.get(f"/brk/x/{uid()}").status_code == 200, 3)
    assert sc.get(f"/lim/x/{uid()}").status_code in (200, 429)
    assert sc.get(f"/lim/x/{uid()}").status_code == 429
    assert sc.get(f"/brk/s/500/{uid()}").status_code == 500
    assert reason(sc.get(f"/brk/x/{uid()}")) == "breaker-open"
    more = keep + (f"service again {{\n    retry 2 on 503 backoff 1ms\n    endpoint {A.url}\n}}\n"
                   f"service capped {{\n    limit 5/s\n    endpoint {A.url}\n}}\n")
    save_by_rename(rel["policy"], RELOAD_BASE.format(extra=more, **rel["fmt"]))
    assert wait_for(lambda: sc.get(f"/capped/x/{uid()}").status_code == 200, 3)
    i = uid()
    r = sc.get(f"/again/flip/{i}")
    assert r.status_code == 200
    r = sc.get(f"/again/flip/{i}")  # the new service's retries work
    assert r.status_code == 503 and r.headers.get("x-riprap-attempts") == "3"
    assert reason(sc.get(f"/brk/x/{uid()}")) == "breaker-open"
    r = sc.get(f"/lim/x/{uid()}")
    if sc.engine == "envoy":
        # the closest thing (engine_differences: limit-reload-refills): another service's
        # new limit starts every local bucket full again; the next call empties it again
        assert r.status_code == 200, ENVOY_DIFFERENCES["limit-reload-refills"].what
        r = sc.get(f"/lim/x/{uid()}")
    assert r.status_code == 429 and reason(r) == "rate-limited"


def _reloads(sc: Sidecar) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(sc.admin.get("/metrics").text)
               if "reload" in fam.name for s in fam.samples
               if s.name.endswith("_total") and "result" in s.labels)


def test_sighup_reloads_and_plan_shows_when(rel: dict[str, Any]) -> None:
    """Section 9: "SIGHUP reloads too" (even with nothing changed: the file is read again and
    the reload counted); `/plan`'s `loaded_at` is when the running plan was put in force."""
    sc, A = rel["sc"], rel["A"]
    before = _reloads(sc)
    sc.signal(signal.SIGHUP)
    assert wait_for(lambda: _reloads(sc) > before, 3), "SIGHUP did not reload"
    assert sc.proc is not None and sc.proc.poll() is None
    doc = sc.admin.get("/plan").json()
    extra = f"service hup {{\n    endpoint {A.url}\n}}\n"
    save_by_rename(rel["policy"], RELOAD_BASE.format(extra=extra, **rel["fmt"]))
    assert wait_for(lambda: sc.admin.get("/plan").json()["hash"] != doc["hash"], 3)
    after = sc.admin.get("/plan").json()
    assert after["loaded_at"] > doc["loaded_at"]  # ISO 8601 in UTC: ordered as text
    assert sc.get(f"/hup/x/{uid()}").status_code == 200
