"""examples/kubernetes/redis.yaml: the store of the checkout fleet's shared limits.

The Redis the policy's `store` names exists in the manifests (Service name, namespace and
port), keeps nothing on disk, lets only the checkout pods in, and the policy's payments
limit is fleet-wide."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from dsl.loader import load_plan_source

K8S = Path(__file__).resolve().parents[1] / "examples" / "kubernetes"


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _one(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs(name) if d["kind"] == kind]
    return doc


def _policy(tmp_path: Path) -> tuple[str, Any]:
    data = _one("configmap.yaml", "ConfigMap")["data"]
    for fname, text in data.items():
        (tmp_path / fname).write_text(text)
    text = data["checkout.riprap"]
    return text, load_plan_source(str(tmp_path / "checkout.riprap"))


def test_the_store_the_policy_names_is_the_redis_service(tmp_path: Path) -> None:
    text, unit = _policy(tmp_path)
    assert re.search(r"^store\s+redis://", text, re.M)
    plan = unit.plan
    assert plan is not None and plan.store is not None
    url = urlsplit(plan.store)
    service = _one("redis.yaml", "Service")
    name, ns = service["metadata"]["name"], service["metadata"]["namespace"]
    assert url.hostname == f"{name}.{ns}.svc.cluster.local"
    assert url.port == service["spec"]["ports"][0]["port"] == 6379
    assert ns == _one("deployment.yaml", "Deployment")["metadata"]["namespace"]
    limit = plan.services["payments"].limit
    assert limit is not None and limit.shared and limit.rate == 200


def test_redis_keeps_nothing_and_only_the_fleet_reaches_it() -> None:
    dep = _one("redis.yaml", "Deployment")
    (redis,) = dep["spec"]["template"]["spec"]["containers"]
    args = redis["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    assert dep["spec"]["selector"]["matchLabels"] == _one("redis.yaml", "Service")["spec"]["selector"]
    netpol = _one("redis.yaml", "NetworkPolicy")
    allowed = netpol["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    app_labels = _one("deployment.yaml", "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert allowed.items() <= app_labels.items()
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= (
        dep["spec"]["template"]["metadata"]["labels"].items())
