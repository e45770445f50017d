"""What `pip install -e '.[test]'` (README) and `pip install riprap` put in a venv.

riprap must not depend on xds-protos: it ships a stale copy of opentelemetry-proto's files
into the same `opentelemetry/proto/` directory and breaks the OTLP exporter (grpc/grpc#42926,
open-telemetry/opentelemetry-python#4843). grpcio serves only the Envoy engine's rate limit
service, so it belongs to the `envoy` extra (and `test`), and the Python engine never
imports it.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, set[str]]:
    """Distribution name -> the extras that bring it ("" = a core dependency)."""
    out: dict[str, set[str]] = {}
    for line in md.requires("riprap") or ():
        name = re.match(r"[A-Za-z0-9._-]+", line)
        assert name is not None, line
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", line)
        key = name.group(0).lower().replace("_", "-")
        out.setdefault(key, set()).add(extra.group(1) if extra else "")
    return out


def test_no_xds_protos_and_grpcio_only_for_the_envoy_engine() -> None:
    reqs = _requirements()
    assert "xds-protos" not in reqs
    assert reqs["grpcio"] == {"envoy", "test"}
    assert {"envoy", "test"} <= reqs["protobuf"]


def test_only_opentelemetry_proto_installs_opentelemetry_proto_files() -> None:
    owners = {dist.metadata["Name"].lower() for dist in md.distributions()
              for f in dist.files or () if str(f).startswith("opentelemetry/proto/")}
    assert owners == {"opentelemetry-proto"}


def test_the_otlp_exporter_imports_in_a_fresh_interpreter() -> None:
    done = subprocess.run(
        [sys.executable, "-c",
         "from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter\n"
         "from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope\n"
         "print(OTLPSpanExporter.__name__)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "OTLPSpanExporter"


def test_the_python_engine_modules_do_not_import_grpc() -> None:
    modules = ["dsl.cli", "sidecar.cli", "sidecar.server", "sidecar.app", "sidecar.proxy",
               "sidecar.admin", "sidecar.reload", "sidecar.supervisor", "policies.store",
               "policies.shared_limit"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
