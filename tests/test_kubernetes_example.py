"""examples/kubernetes: the manifests parse, and the fields that make riprap a working
sidecar are there (probes on the admin port, a ConfigMap mounted so updates reach the
pod, Prometheus annotations, HTTP_PROXY pointing at riprap), and the policy compiles."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from dsl.loader import load_plan_source

K8S = Path(__file__).resolve().parents[1] / "examples" / "kubernetes"


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    (dep,) = [d for d in _docs("deployment.yaml") if d["kind"] == "Deployment"]
    return dep


@pytest.fixture(scope="module")
def configmap() -> dict[str, Any]:
    (cm,) = [d for d in _docs("configmap.yaml") if d["kind"] == "ConfigMap"]
    return cm


def _riprap(pod: dict[str, Any]) -> dict[str, Any]:
    containers = pod.get("initContainers", []) + pod["containers"]
    (c,) = [c for c in containers if c["name"] == "riprap"]
    return c


def test_riprap_is_a_sidecar_of_the_app(deployment: dict[str, Any]) -> None:
    pod = deployment["spec"]["template"]["spec"]
    side = _riprap(pod)
    if side in pod.get("initContainers", []):
        assert side["restartPolicy"] == "Always"  # a native sidecar, not a one-shot init
    assert side["args"][0] == "run"
    app = [c for c in pod["containers"] if c["name"] != "riprap"]
    assert app, "the app container runs beside riprap"
    env = {e["name"]: e["value"] for e in app[0]["env"]}
    assert env["HTTP_PROXY"] == "http://127.0.0.1:7400"


def test_probes_hit_the_admin_port(deployment: dict[str, Any], configmap: dict[str, Any]) -> None:
    side = _riprap(deployment["spec"]["template"]["spec"])
    ports = {p["name"]: p["containerPort"] for p in side["ports"]}
    assert side["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert side["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        port = side[probe]["httpGet"]["port"]
        assert ports.get(port, port) == 7401
    policy = configmap["data"]["checkout.riprap"]
    assert re.search(r"^admin\s+0\.0\.0\.0:7401", policy, re.M), "kubelet must reach admin"
    assert re.search(r"^listen\s+127\.0\.0\.1:7400", policy, re.M)


def test_prometheus_scrape_annotations(deployment: dict[str, Any]) -> None:
    ann = deployment["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == "7401"
    assert ann["prometheus.io/path"] == "/metrics"


def test_policy_configmap_is_mounted_as_a_directory(deployment: dict[str, Any],
                                                    configmap: dict[str, Any]) -> None:
    pod = deployment["spec"]["template"]["spec"]
    side = _riprap(pod)
    (vol,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name")
              == configmap["metadata"]["name"]]
    (mount,) = [m for m in side["volumeMounts"] if m["name"] == vol["name"]]
    assert "subPath" not in mount, "subPath mounts never see ConfigMap updates"
    policy_path = side["args"][1]
    assert Path(policy_path).parent == Path(mount["mountPath"])
    assert Path(policy_path).name in configmap["data"]
    assert configmap["metadata"]["namespace"] == deployment["metadata"]["namespace"]


def test_policy_in_the_configmap_compiles_clean(configmap: dict[str, Any], tmp_path: Path) -> None:
    for name, text in configmap["data"].items():
        (tmp_path / name).write_text(text)
    unit = load_plan_source(str(tmp_path / "checkout.riprap"))
    assert unit.ok, [d.message for d in unit.diagnostics]
    # no warnings either, but the one the pod asks for: admin on every interface, for probes
    assert [d.code for d in unit.diagnostics] == ["RP311"]
    assert unit.plan is not None
    assert unit.plan.admin == "0.0.0.0:7401"
    assert set(unit.plan.services) == {"payments", "inventory", "recommendations"}


def test_payments_are_found_through_a_headless_service(configmap: dict[str, Any],
                                                       tmp_path: Path) -> None:
    (svc,) = [d for d in _docs("payments-headless.yaml") if d["kind"] == "Service"]
    assert svc["spec"]["clusterIP"] == "None"  # headless: DNS lists the pods themselves
    name = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    port = svc["spec"]["ports"][0]["port"]
    for fname, text in configmap["data"].items():
        (tmp_path / fname).write_text(text)
    unit = load_plan_source(str(tmp_path / "checkout.riprap"))
    assert unit.plan is not None
    (primary,) = [e for e in unit.plan.services["payments"].endpoints if e.tier == 0]
    assert primary.url == f"http://{name}:{port}" and primary.resolve == 5.0
