"""Every example compiles to exactly its golden Envoy configuration, real Envoy accepts each
golden (`--mode validate`, on the bootstrap and on every listener and cluster), and Envoy
started on each one loads every listener and cluster it names with no rejected update."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from sidecar.engines.envoy.config import (
    CDS_FILE,
    ECDS_FILE,
    LDS_FILE,
    RDS_FILE,
    UPSTREAM_ECDS_FILE,
    to_yaml,
    validation_bootstrap,
)
from riprap_testing.faults import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sidecar" / "engines"))
from envoy_harness import envoy_binary  # noqa: E402

_spec = importlib.util.spec_from_file_location("golden_regen_envoy", Path(__file__).with_name("regen_envoy.py"))
assert _spec is not None and _spec.loader is not None
regen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regen)
ROOT, EXAMPLES = regen.ROOT, regen.examples()


def _ids(p: Path) -> str:
    return str(p.relative_to(ROOT).as_posix())


def _validate(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config), "-l", "error"],
                          capture_output=True, text=True, timeout=60, cwd=cwd)


@pytest.mark.parametrize("example", EXAMPLES, ids=_ids)
def test_golden_envoy_config(example: Path, tmp_path: Path) -> None:
    golden = regen.golden_dir(example)
    assert golden.is_dir(), f"no golden Envoy config for {example}: run tests/golden/regen_envoy.py"
    regen.write_golden(example, tmp_path)
    for name in sorted(p.name for p in golden.iterdir()):
        assert (tmp_path / name).read_text() == (golden / name).read_text(), (
            f"{name} of {example} changed: review, then run tests/golden/regen_envoy.py")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in golden.iterdir())


@pytest.mark.parametrize("example", EXAMPLES, ids=_ids)
def test_envoy_validates_golden(example: Path, tmp_path: Path) -> None:
    golden = regen.golden_dir(example)
    done = _validate(golden / "envoy.yaml", golden)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr
    # the bootstrap alone names the resources; this one holds them, so every
    # listener, route and cluster goes through Envoy's own validation
    static = tmp_path / "static.yaml"
    static.write_text(to_yaml(validation_bootstrap(regen.golden_config(example))))
    done = _validate(static, golden)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr


def _stats(admin: httpx.Client) -> dict[str, int]:
    out = {}
    for line in admin.get("/stats").text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name] = int(value)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=_ids)
def test_envoy_loads_golden_without_rejection(example: Path, tmp_path: Path) -> None:
    golden = regen.golden_dir(example)
    listen, admin_port = free_port(), free_port()
    for name in ("envoy.yaml", LDS_FILE, RDS_FILE, CDS_FILE, ECDS_FILE, UPSTREAM_ECDS_FILE):
        text = (golden / name).read_text()
        data = yaml.safe_load(text)
        if name == "envoy.yaml":
            data["admin"]["address"]["socket_address"]["port_value"] = admin_port
        elif name == LDS_FILE:
            data["resources"][0]["address"]["socket_address"]["port_value"] = listen
        (tmp_path / name).write_text(to_yaml(data))
    clusters = len(yaml.safe_load((golden / CDS_FILE).read_text())["resources"])
    with open(tmp_path / "envoy.log", "wb") as log:  # the child keeps its own copy
        proc = subprocess.Popen([envoy_binary(), "-c", "envoy.yaml", "--concurrency", "1",
                                 "--disable-hot-restart", "-l", "warning"], cwd=tmp_path, stdout=log, stderr=log)
    admin = httpx.Client(base_url=f"http://127.0.0.1:{admin_port}", trust_env=False, timeout=5)
    try:
        deadline = time.monotonic() + 30
        stats: dict[str, int] = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "envoy.log").read_text()
            try:
                stats = _stats(admin)
                if stats.get("listener_manager.total_listeners_active") == 1 and \
                        stats.get("cluster_manager.active_clusters", 0) + stats.get(
                            "cluster_manager.warming_clusters", 0) >= clusters:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        assert stats.get("listener_manager.lds.update_rejected") == 0
        assert stats.get("cluster_manager.cds.update_rejected") == 0
        assert stats.get("listener_manager.lds.update_success", 0) >= 1
        assert stats.get("cluster_manager.cds.update_success", 0) >= 1
        assert stats.get("listener_manager.total_listeners_active") == 1
        assert stats.get("http.riprap.rds.riprap.update_rejected") == 0
        assert stats.get("http.riprap.rds.riprap.update_success", 0) >= 1
        assert stats["cluster_manager.active_clusters"] + stats["cluster_manager.warming_clusters"] == clusters
    finally:
        admin.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
