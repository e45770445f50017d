"""Acceptance: the admin listener and the command line.

A real `riprap run` on loopback with this file's own small policy, next to its tests
(written from /work/shared/language.md; each test cites its contract section). The
sidecar comes from the `run_sidecar` fixture (conftest.py), the upstreams from `ups`."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from acc_kit import (
    RunSidecar,
    attempts,
    clean_env,
    free_port,
    reason,
    riprap_cmd,
    sidecar_env,
    uid,
    wait_for,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
]

# the services of this file's policy (the admin listener names each one)
SERVICES = ['echo', 'passthru', 'slow', 'sharded', 'chaotic']


def policy(A: str, B: str, C: str, DEAD: str, listen: int, admin: int) -> str:
    return f"""\
app acc
listen 127.0.0.1:{listen}
admin 127.0.0.1:{admin}

service echo {{
    host echo.internal, alias.example
    endpoint {A}
}}

service passthru {{
    retry 2 on 5xx backoff 1ms
    endpoint {A}
}}

service slow {{
    timeout 300ms
    endpoint {A}
}}

service sharded {{
    shard by header X-Key
    shard default a
    shard a {{
        endpoint {A}
    }}
    shard b {{
        endpoint {B}
    }}
}}

service chaotic {{
    chaos abort 100% status 418
    endpoint {A}
}}

"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, ups: dict[str, Any],
        run_sidecar: RunSidecar) -> Iterator[dict[str, Any]]:
    yield from sidecar_env(policy, tmp_path_factory, ups, run_sidecar)


def test_listen_and_admin_flags_override_the_file(env: dict[str, Any]) -> None:
    # contract §8 run: "--listen and --admin override the file"
    sc = env["sc"]
    assert sc.admin.get("/healthz").status_code == 200
    assert sc.get("/echo/x").status_code == 200
    for p in (env["file_listen"], env["file_admin"]):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{p}/healthz", trust_env=False, timeout=2)


def test_chaos_inactive_without_flag(env: dict[str, Any]) -> None:
    for _ in range(3):
    # contract §4 chaos: "active only when the sidecar runs with --chaos"
        r = env["sc"].get(f"/chaotic/x/{uid()}")
        assert r.status_code == 200


def test_admin_healthz_readyz(env: dict[str, Any]) -> None:
    # contract §9 Admin: "/healthz 200 while the process lives; /readyz 200 once a plan is loaded"
    adm = env["sc"].admin
    assert adm.get("/healthz").status_code == 200
    assert adm.get("/readyz").status_code == 200


def test_admin_metrics_is_prometheus_text(env: dict[str, Any]) -> None:
    # contract §9 Admin: "GET /metrics Prometheus text"
    from prometheus_client.parser import text_string_to_metric_families

    env["sc"].get(f"/echo/m/{uid()}")
    r = env["sc"].admin.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    fams = list(text_string_to_metric_families(r.text))
    assert fams and "# TYPE" in r.text


def test_admin_plan(env: dict[str, Any]) -> None:
    doc = env["sc"].admin.get("/plan").json()
    assert {"plan", "hash", "loaded_at", "last_error"} <= set(doc)
    assert doc["last_error"] is None
    assert isinstance(doc["hash"], str) and doc["hash"]
    datetime.fromisoformat(doc["loaded_at"].replace("Z", "+00:00"))
    plan = doc["plan"]
    assert plan["version"] == 1 and plan["app"] == "acc"
    assert set(SERVICES) <= set(plan["services"])
    assert plan["services"]["slow"]["timeout"] == pytest.approx(0.3)
    assert plan["services"]["passthru"]["retry"]["retries"] == 2
    assert plan["services"]["echo"]["retry"] is None  # section 5: what is not written is off


def test_admin_state_names_services_shards_endpoints(env: dict[str, Any]) -> None:
    # contract §9 Admin: "/state health, ejection, breaker and limiter state of every service, shard and endpoint"
    r = env["sc"].admin.get("/state")
    assert r.status_code == 200
    text = json.dumps(r.json())
    for name in SERVICES:
        assert f'"{name}"' in text
    assert f"127.0.0.1:{env['A'].port}" in text and f"127.0.0.1:{env['B'].port}" in text
    for word in ("breaker", "health", "eject", "limit"):
        assert word in text.lower()


def test_compiled_plan_json_with_chaos(tmp_path: Path, ups: dict[str, Any],
                                       env: dict[str, Any], run_sidecar: RunSidecar) -> None:
    A, B, C = ups["A"], ups["B"], ups["C"]
    src = tmp_path / "chaos.riprap"
    src.write_text(f"""\
app chaosapp
defaults {{
    timeout 450ms
}}
service chaotic {{
    chaos abort 100% status 418
    endpoint {A.url}
}}
service calm {{
    endpoint {A.url}
}}
service abortdef {{
    chaos abort 100%
    endpoint {A.url}
}}
service sharded {{
    shard by header X-Key
    shard default a
    shard a {{
        endpoint {A.url}
    }}
    shard b {{
        endpoint {B.url}
    }}
}}
service sharded3 {{
    shard by header X-Key
    shard a {{
        endpoint {A.url}
    }}
    shard b {{
        endpoint {B.url}
    }}
    shard c {{
        endpoint {C.url}
    }}
}}
service delayed {{
    chaos delay 100% 300ms
    endpoint {A.url}
}}
""", encoding="utf-8")
    out = tmp_path / "chaos-plan.json"
    cp = subprocess.run([*riprap_cmd(), "compile", str(src), "-o", str(out)],
                        capture_output=True, env=clean_env(), timeout=30)
    assert cp.returncode == 0, cp.stderr
    port, admin = free_port(), free_port()
    sc = run_sidecar(out, "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                     "--chaos", port=port, admin=admin)
    try:
        i = uid()
        r = sc.get(f"/chaotic/x/{i}")
        assert r.status_code == 418
        assert "x-riprap-reason" in r.headers  # section 9: an answer riprap made itself
        attempts(r)
        assert A.hits(i) == []  # injected before the call leaves
        assert sc.get(f"/calm/x/{uid()}").status_code == 200
        assert sc.get(f"/abortdef/x/{uid()}").status_code == 503  # default status 503
        r = sc.get(f"/calm/sleep/1/{uid()}")  # section 3: defaults apply to every service
        assert r.status_code == 504 and reason(r) == "timeout"
        # section 5: a key maps the same way in every process (stable hash), and adding a
        # shard moves keys only to the new shard (rendezvous hashing)
        moved = 0
        for n in range(48):
            k = {"X-Key": f"user-{n}"}
            here = sc.get("/sharded/x", headers=k).headers["x-upstream"]
            there = env["sc"].get("/sharded/x", headers=k).headers["x-upstream"]
            assert here == there, f"user-{n}: {here} here, {there} in another process"
            three = sc.get("/sharded3/x", headers=k).headers["x-upstream"]
            assert three in (here, "C"), f"user-{n} moved from {here} to {three}"
            moved += three == "C"
        assert 5 <= moved <= 30, moved
        t = time.monotonic()
        assert sc.get(f"/delayed/x/{uid()}").status_code == 200
        assert time.monotonic() - t >= 0.29
        assert sc.admin.get("/plan").json()["plan"]["app"] == "chaosapp"
        # section 8/9: a plan .json is hot-reloaded too
        src.write_text(src.read_text() + f"service later {{\n    endpoint {A.url}\n}}\n")
        tmp = tmp_path / "next.json"
        cp = subprocess.run([*riprap_cmd(), "compile", str(src), "-o", str(tmp)],
                            capture_output=True, env=clean_env(), timeout=30)
        assert cp.returncode == 0, cp.stderr
        os.replace(tmp, out)
        t = time.monotonic()
        assert wait_for(lambda: sc.get(f"/later/x/{uid()}").status_code == 200, 3)
        assert time.monotonic() - t <= 1.2
    finally:
        sc.stop()


def test_run_refuses_broken_and_missing_files(tmp_path: Path) -> None:
    # contract §8: run FILE; exit codes as check (1 errors, 2 I/O)
    bad = tmp_path / "bad.riprap"
    bad.write_text("service x {\n    retry lots\n}\n")
    cp = subprocess.run([*riprap_cmd(), "run", str(bad), "--listen", f"127.0.0.1:{free_port()}",
                         "--admin", f"127.0.0.1:{free_port()}"],
                        capture_output=True, env=clean_env(), timeout=20)
    assert cp.returncode == 1
    assert b"bad.riprap:2:" in cp.stderr + cp.stdout
    cp = subprocess.run([*riprap_cmd(), "run", str(tmp_path / "nope.riprap")],
                        capture_output=True, env=clean_env(), timeout=20)
    assert cp.returncode == 2


def test_run_refuses_a_plan_json_that_fails_the_schema(tmp_path: Path) -> None:
    """Section 7: the plan is validated against its schema on every load."""
    src = tmp_path / "ok.riprap"
    src.write_text("service s {\n    endpoint http://127.0.0.1:9\n}\n")
    out = tmp_path / "ok.json"
    cp = subprocess.run([*riprap_cmd(), "compile", str(src), "-o", str(out)],
                        capture_output=True, env=clean_env(), timeout=30)
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(out.read_text())
    doc["version"] = 99
    doc["services"]["s"]["timeout"] = "soon"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    cp = subprocess.run([*riprap_cmd(), "run", str(bad), "--listen", f"127.0.0.1:{free_port()}",
                         "--admin", f"127.0.0.1:{free_port()}"],
                        capture_output=True, env=clean_env(), timeout=20)
    assert cp.returncode not in (0, None)
    assert b"Traceback" not in cp.stderr


def test_plan_endpoint_serves_the_compiled_plan(env: dict[str, Any]) -> None:
    # contract §9 Admin: "/plan ... plan (the running plan)"; §7 the plan `riprap compile` prints
    cp = subprocess.run([*riprap_cmd(), "compile", str(env["policy"])], capture_output=True,
                        env=clean_env(), timeout=30, cwd=str(env["dir"]))
    assert cp.returncode == 0, cp.stderr
    compiled = json.loads(cp.stdout)
    running = env["sc"].admin.get("/plan").json()["plan"]
    for doc in (compiled, running):  # the addresses may show the command-line overrides
        doc.pop("listen", None)
        doc.pop("admin", None)
    assert running == compiled
