"""TLS to upstreams (CA, SNI, verification, certificates from watched SDS files) and
DNS-resolved endpoints, on real Envoy; shared limits and chaos in the compiled config."""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from dsl.plan import ChaosSpec, EndpointSpec, LimitSpec, Plan, ServicePlan, TlsSpec
from envoy_harness import RunningEnvoy, validate
from sidecar.engines.envoy import EnvoyPorts, build_config, cluster_name, write_config
from sidecar.engines.envoy.config import to_yaml, validation_bootstrap
from riprap_testing.faults import FaultServer

pytestmark = pytest.mark.slow


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    d = tmp_path / "certs"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=riprap test CA", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=upstream.test", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:upstream.test\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


@pytest.fixture
def https_upstream(certs: Path) -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = f"tls ok {self.headers.get('host')}".encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _plan(**services: ServicePlan) -> Plan:
    return Plan(app="t", services=services)


def test_tls_with_ca_and_sni(tmp_path: Path, certs: Path, https_upstream: int) -> None:
    good = ServicePlan(name="secure", endpoints=(EndpointSpec(f"https://127.0.0.1:{https_upstream}"),),
                       tls=TlsSpec(ca=str(certs / "ca.pem"), sni="upstream.test"), timeout=5.0)
    wrong_name = ServicePlan(name="wrongname", endpoints=(EndpointSpec(f"https://127.0.0.1:{https_upstream}"),),
                             tls=TlsSpec(ca=str(certs / "ca.pem"), sni="other.test"), timeout=5.0)
    unverified = ServicePlan(name="loose", endpoints=(EndpointSpec(f"https://127.0.0.1:{https_upstream}"),),
                             tls=TlsSpec(verify=False), timeout=5.0)
    with RunningEnvoy(tmp_path, _plan(secure=good, wrongname=wrong_name, loose=unverified)) as env:
        files = sorted(env.config.resources)
        assert "sds-secure-ca.yaml" in files
        r = env.client.get("/", headers={"Host": "secure"})
        assert r.status_code == 200 and r.text.startswith("tls ok")
        r = env.client.get("/", headers={"Host": "wrongname"})
        assert r.status_code == 502 and r.headers["x-riprap-reason"] == "upstream-failed"
        assert env.client.get("/", headers={"Host": "loose"}).status_code == 200


def test_client_certificate_secret_is_a_watched_file(tmp_path: Path, certs: Path) -> None:
    svc = ServicePlan(name="mtls", endpoints=(EndpointSpec("https://upstream.test:8443"),),
                      tls=TlsSpec(ca=str(certs / "ca.pem"), cert=str(certs / "server.pem"),
                                  key=str(certs / "server.key")))
    config = build_config(_plan(mtls=svc), EnvoyPorts("127.0.0.1", 1, 2), dynamic_dir=tmp_path, chaos=False)
    secret = config.resources["sds-mtls-cert.yaml"]["resources"][0]
    assert secret["tls_certificate"]["watched_directory"] == {"path": str(certs)}
    cluster = config.resources["cds.yaml"]["resources"][0]
    ctx = cluster["transport_socket"]["typed_config"]
    assert ctx["sni"] == "upstream.test"
    sds = ctx["common_tls_context"]["tls_certificate_sds_secret_configs"][0]["sds_config"]
    assert sds["path_config_source"]["path"] == str(tmp_path / "sds-mtls-cert.yaml")
    write_config(config, tmp_path)
    static = tmp_path / "static.yaml"
    static.write_text(to_yaml(validation_bootstrap(config)))
    done = validate(static)
    assert done.returncode == 0, done.stdout + done.stderr


class _DnsServer:
    """A minimal UDP DNS server on 127.0.0.1 answering A queries for one name."""

    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name = name.lower().rstrip(".")
        self.addresses = addresses
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(512)
            except OSError:
                return
            self.queries += 1
            qid, qd = data[:2], data[12:]
            end = qd.index(b"\x00") + 5
            question = qd[:end]
            labels, i = [], 0
            while qd[i]:
                labels.append(qd[i + 1:i + 1 + qd[i]].decode())
                i += qd[i] + 1
            qtype = int.from_bytes(qd[i + 1:i + 3], "big")
            answers = b""
            count = 0
            if ".".join(labels).lower() == self.name and qtype == 1:
                for addr in self.addresses:
                    answers += b"\xc0\x0c" + b"\x00\x01\x00\x01" + (1).to_bytes(4, "big") + b"\x00\x04" + \
                        socket.inet_aton(addr)
                    count += 1
            header = qid + b"\x81\x80" + b"\x00\x01" + count.to_bytes(2, "big") + b"\x00\x00\x00\x00"
            self.sock.sendto(header + question + answers, peer)

    def close(self) -> None:
        self.sock.close()


def test_resolved_endpoints_use_the_plan_resolver(tmp_path: Path) -> None:
    up = FaultServer(name="dns-target").start()
    dns = _DnsServer("pool.riprap.test", ["127.0.0.1"])
    try:
        svc = ServicePlan(name="pool", timeout=5.0,
                          endpoints=(EndpointSpec(f"http://pool.riprap.test:{up.port}", weight=3, resolve=0.5),))
        plan = Plan(app="t", services={"pool": svc}, resolver=(f"127.0.0.1:{dns.port}",))
        with RunningEnvoy(tmp_path, plan) as env:
            cluster = env.config.resources["cds.yaml"]["resources"][0]
            assert cluster["type"] == "STRICT_DNS" and cluster["dns_refresh_rate"] == "0.5s"
            r = env.client.get("/", headers={"Host": "pool"})
            assert r.status_code == 200 and r.json()["server"] == "dns-target"
            headers = {k.lower(): v for k, v in up.recent[-1]["headers"]}
            assert headers["host"] == f"pool.riprap.test:{up.port}"
            assert dns.queries >= 1
    finally:
        dns.close()
        up.stop()


def test_shared_limit_uses_the_rate_limit_service(tmp_path: Path) -> None:
    svc = ServicePlan(name="api", endpoints=(EndpointSpec("http://127.0.0.1:9"),),
                      limit=LimitSpec(rate=5, burst=5, per_header="X-User", shared=True))
    plan = Plan(app="shop", services={"api": svc}, store="redis://127.0.0.1:6379")
    config = build_config(plan, EnvoyPorts("127.0.0.1", 1, 2, ratelimit_port=8081), dynamic_dir=tmp_path,
                          chaos=False)
    hcm = config.resources["lds.yaml"]["resources"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    rl = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ratelimit"][0]["typed_config"]
    assert rl["domain"] == "shop" and rl["failure_mode_deny"] is False
    assert hcm["rds"]["route_config_name"] == "riprap"
    route = config.resources["rds.yaml"]["resources"][0]["virtual_hosts"][0]["routes"][1]["route"]
    actions = route["rate_limits"][0]["actions"]
    assert actions == [
        {"generic_key": {"descriptor_key": "riprap_service", "descriptor_value": "api"}},
        {"request_headers": {"header_name": "x-user", "descriptor_key": "riprap_key"}},
    ]
    names = [c["name"] for c in config.resources["cds.yaml"]["resources"]]
    assert names == [cluster_name("api"), "_riprap_ratelimit"]
    static = tmp_path / "static.yaml"
    static.write_text(yaml.safe_dump(validation_bootstrap(config)))
    done = validate(static)
    assert done.returncode == 0, done.stdout + done.stderr


def test_chaos_faults_only_with_chaos(tmp_path: Path) -> None:
    up = FaultServer(name="c").start()
    try:
        svc = ServicePlan(name="flaky", endpoints=(EndpointSpec(up.url),),
                          chaos=(ChaosSpec("abort", 1.0, status=503),))
        plan = Plan(app="t", services={"flaky": svc})
        calm = build_config(plan, EnvoyPorts("127.0.0.1", 1, 2), dynamic_dir=tmp_path, chaos=False)
        assert "envoy.filters.http.fault" not in yaml.safe_dump(calm.resources["lds.yaml"])
        with RunningEnvoy(tmp_path, plan, chaos=True) as env:
            r = env.client.get("/", headers={"Host": "flaky"})
            assert r.status_code == 503
            assert r.headers["x-riprap-reason"] == "chaos-abort" and r.headers["x-riprap-chaos"] == "abort"
            assert up.hits == 0
    finally:
        up.stop()
