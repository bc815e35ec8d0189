"""TLS in front of Serve's gRPC proxy: real nginx (deploy/tls/start.sh), real handshakes, the real app.

    client --TLS--> nginx (deploy/tls/nginx.conf.template) --h2c--> Serve gRPC proxy --> replica

Needs `nginx` (Debian: apt-get install -y nginx-light) and `openssl` on PATH; the
tests skip with that message when either is missing and install nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from tests.conftest import REPO_ROOT, free_port, listening_ports
from tests.payloads import observation

TLS_DIR = REPO_ROOT / "deploy" / "tls"
API_KEY = "tls-test-key-6f1e"
WITH_KEY = (("x-api-key", API_KEY),)

pytestmark = [
    pytest.mark.serve,
    pytest.mark.skipif(
        not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()) or not shutil.which("openssl"),
        reason="TLS tests need nginx and openssl on PATH (Debian/Ubuntu: apt-get install -y nginx-light openssl)",
    ),
]


class TlsProxy:
    """deploy/tls/start.sh in the foreground, as an operator runs it; stopped with SIGTERM."""

    def __init__(self, certs: Path, run_dir: Path, upstream: str, mtls: bool = False):
        self.address = f"127.0.0.1:{free_port()}"
        self.log = run_dir.with_suffix(".log")
        args = [str(TLS_DIR / "start.sh"), "--upstream", upstream, "--listen", self.address,
                "--certs", str(certs), "--run-dir", str(run_dir), "--log-level", "info"]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(args + (["--mtls"] if mtls else []), stdout=log, stderr=subprocess.STDOUT)
        self._wait_listening(10)

    def _wait_listening(self, timeout_s: float) -> None:
        # Ask the OS whether nginx (start.sh's process tree) listens: a probe connect to a free
        # ephemeral port can succeed against itself (TCP self-connect) before nginx is up.
        port = int(self.address.rsplit(":", 1)[1])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"start.sh exited {self.process.returncode}: {self.log.read_text()}")
            if port in listening_ports(self.process.pid):
                return
            time.sleep(0.05)
        raise TimeoutError(f"nginx not listening on {self.address}: {self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run([str(TLS_DIR / "make_certs.sh"), str(out), "robot-1"], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def foreign_certs(tmp_path_factory) -> Path:
    """Another CA and a robot certificate it signed: not trusted by our proxy."""
    out = tmp_path_factory.mktemp("foreign")
    subprocess.run([str(TLS_DIR / "make_certs.sh"), str(out), "intruder"], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def keyed_app(serve_harness, tmp_path_factory) -> str:
    key_file = tmp_path_factory.mktemp("key") / "api_key"
    key_file.write_text(API_KEY + "\n")
    return serve_harness.deploy({"api_key_file": str(key_file)}, metadata=WITH_KEY)


@pytest.fixture(scope="module")
def tls_proxy(certs, keyed_app, tmp_path_factory):
    proxy = TlsProxy(certs, tmp_path_factory.mktemp("run") / "tls", keyed_app)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def mtls_proxy(certs, keyed_app, tmp_path_factory):
    proxy = TlsProxy(certs, tmp_path_factory.mktemp("run") / "mtls", keyed_app, mtls=True)
    yield proxy
    proxy.stop()


def credentials(certs: Path | None, robot: str | None = None, ca_dir: Path | None = None) -> grpc.ChannelCredentials:
    """What a robot holds: the CA it trusts, and (for mTLS) its own key and certificate."""
    ca = (certs / "ca.pem").read_bytes() if certs else None
    if robot is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    own = ca_dir or certs
    return grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=(own / "robots" / f"{robot}.key").read_bytes(),
        certificate_chain=(own / "robots" / f"{robot}.pem").read_bytes(),
    )


def call_health(address: str, creds, metadata=WITH_KEY, timeout: float = 10) -> pb.HealthCheckResponse:
    with grpc.secure_channel(address, creds) as channel:
        return pb_grpc.RobotPolicyServiceStub(channel).HealthCheck(pb.HealthCheckRequest(), metadata=metadata, timeout=timeout)


def refused(fn) -> grpc.RpcError:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert time.monotonic() - started < 5, "a refusal must come at once, not at the deadline"
    return info.value


def exercise(address: str, creds, metadata=WITH_KEY) -> None:
    """Unary chunk, a 6-message bidi stream and the standard health probe, all through the proxy."""
    with grpc.secure_channel(address, creds) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        assert stub.HealthCheck(pb.HealthCheckRequest(), metadata=metadata, timeout=10).healthy
        unary = stub.GetActionChunk(observation(request_id="tls-unary"), metadata=metadata, timeout=10)
        assert unary.request_id == "tls-unary" and len(unary.action_chunk) == 16 and unary.error_code == 0
        requests = [observation(seed=i, request_id=f"tls-{i}") for i in range(6)]
        answers = list(stub.StreamActionChunks(iter(requests), metadata=metadata, timeout=30))
        assert [a.request_id for a in answers] == [r.request_id for r in requests]
        assert all(len(a.action_chunk) == 16 and a.error_code == 0 for a in answers)
        probe = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert probe.status == health_pb2.HealthCheckResponse.SERVING


def test_a_client_with_the_ca_gets_chunks_and_streams_through_tls(tls_proxy, certs):
    exercise(tls_proxy.address, credentials(certs))


def test_a_client_without_the_ca_fails_the_handshake(tls_proxy):
    # System roots only: our private CA is unknown to it.
    err = refused(lambda: call_health(tls_proxy.address, credentials(None)))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in err.details()


def test_a_client_trusting_another_ca_fails_the_handshake(tls_proxy, foreign_certs):
    err = refused(lambda: call_health(tls_proxy.address, credentials(foreign_certs)))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in err.details()


def test_plaintext_to_the_tls_port_is_refused(tls_proxy):
    def plaintext():
        with grpc.insecure_channel(tls_proxy.address) as channel:
            pb_grpc.RobotPolicyServiceStub(channel).HealthCheck(pb.HealthCheckRequest(), metadata=WITH_KEY, timeout=10)

    assert refused(plaintext).code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)


@pytest.mark.parametrize("metadata", [(), (("x-api-key", "not-the-key"),)], ids=["no key", "wrong key"])
def test_the_api_key_still_applies_behind_tls(tls_proxy, certs, metadata):
    creds = credentials(certs)
    err = refused(lambda: call_health(tls_proxy.address, creds, metadata=metadata))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in err.details()
    with grpc.secure_channel(tls_proxy.address, creds) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        err = refused(lambda: stub.GetActionChunk(observation(), metadata=metadata, timeout=10))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = refused(lambda: list(stub.StreamActionChunks(iter([observation()]), metadata=metadata, timeout=10)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_mtls_refuses_a_client_without_a_certificate(mtls_proxy, certs):
    err = refused(lambda: call_health(mtls_proxy.address, credentials(certs)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "client certificate" in err.details()


def test_mtls_refuses_a_certificate_from_another_ca(mtls_proxy, certs, foreign_certs):
    creds = credentials(certs, robot="intruder", ca_dir=foreign_certs)
    err = refused(lambda: call_health(mtls_proxy.address, creds))
    assert err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE)


def test_mtls_serves_a_robot_with_its_certificate(mtls_proxy, certs):
    exercise(mtls_proxy.address, credentials(certs, robot="robot-1"))
    # The key is checked behind mTLS too: a certificate is not a substitute for it.
    err = refused(lambda: call_health(mtls_proxy.address, credentials(certs, robot="robot-1"), metadata=()))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_serve_unreachable_behind_the_proxy_is_unavailable_not_an_html_page(certs, tmp_path):
    proxy = TlsProxy(certs, tmp_path / "dead", upstream=f"127.0.0.1:{free_port()}")
    try:
        err = refused(lambda: call_health(proxy.address, credentials(certs)))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "unreachable" in err.details()
    finally:
        proxy.stop()


def robot_client_speaks_tls() -> bool:
    from robot_client.__main__ import parser

    return all(flag in parser().format_help() for flag in ("--tls-ca", "--tls-cert", "--tls-key"))


@pytest.mark.skipif(not robot_client_speaks_tls(), reason="robot_client has no --tls-ca/--tls-cert/--tls-key yet")
def test_the_robot_client_runs_its_control_loop_over_mtls(mtls_proxy, certs, tmp_path):
    out = tmp_path / "stats.json"
    robot = certs / "robots" / "robot-1"
    result = subprocess.run(
        [sys.executable, "-m", "robot_client", "--server_address", mtls_proxy.address, "--prompt", "pick",
         "--robot", "replay", "--mode", "stream", "--duration", "2", "--timeout", "10", "--api-key", API_KEY,
         "--tls-ca", str(certs / "ca.pem"), "--tls-cert", f"{robot}.pem", "--tls-key", f"{robot}.key",
         "--stats_json", str(out)],
        capture_output=True, text=True, timeout=90, cwd=REPO_ROOT, check=False,
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(out.read_text())
    assert stats["chunks_accepted"] >= 3 and stats["failures"] == {}
    # Without its certificate the same robot is refused, with a message, not retried forever.
    refused_run = subprocess.run(
        [sys.executable, "-m", "robot_client", "--server_address", mtls_proxy.address, "--prompt", "pick",
         "--robot", "replay", "--timeout", "5", "--api-key", API_KEY, "--tls-ca", str(certs / "ca.pem")],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, check=False,
    )
    assert refused_run.returncode == 2 and "certificate" in refused_run.stderr
