"""`python -m serve_app --config_path=...`: OpenTau's command line starts the same app."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from serve_app.__main__ import launch_plan, parse_args
from serve_app.ingress import load_config
from testbed.cluster_ports import SINGLE_PORTS, private_ports_env
from tests.conftest import (DEMO_CHECKPOINT, REPO_ROOT, free_port, launcher_env, listening_ports, node_addresses,
                            process_tree_cmdlines, sockets_off_loopback, stop_process_group, wait_for_health)


def test_plan_takes_port_from_the_command_line_then_the_checkpoint():
    plan = launch_plan(parse_args([f"--config_path={DEMO_CHECKPOINT}/train_config.json", "--server.port=6001"]))
    assert plan["grpc_options"]["port"] == 6001
    assert plan["applications"][0]["args"]["checkpoint"] == str(DEMO_CHECKPOINT / "train_config.json")
    plan = launch_plan(parse_args([f"--config_path={DEMO_CHECKPOINT}", "--server.max_workers=300"]))
    assert plan["grpc_options"]["port"] == 50051  # the checkpoint's server section
    assert plan["applications"][0]["deployments"][0]["max_ongoing_requests"] == 300


def test_max_workers_never_caps_batching():
    plan = launch_plan(parse_args([f"--config_path={DEMO_CHECKPOINT}", "--server.max_workers=2"]))
    deployment = plan["applications"][0]["deployments"][0]
    assert deployment["max_ongoing_requests"] >= deployment["user_config"]["max_batch_size"]


def test_serve_config_is_what_the_launcher_reads():
    config = load_config()
    assert config["grpc_options"]["port"] == 50051
    assert config["applications"][0]["import_path"] == "serve_app.app:build_app"


@pytest.mark.serve
def test_launcher_serves_the_checkpoint(tmp_path: Path):
    port = free_port()
    private_ports = private_ports_env()
    log = (tmp_path / "launcher.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve_app", f"--config_path={DEMO_CHECKPOINT}", f"--server.port={port}", "--address=local",
         "--no_dashboard"],
        cwd=REPO_ROOT, env=launcher_env(private_ports), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        health = wait_for_health(f"127.0.0.1:{port}", timeout_s=180)
        assert health.policy_type == "visuomotor_chunk" and health.chunk_length == 16
        # As serve_config.yaml says, behind the throughput-optimised ingress (an HAProxy process).
        # serve_config.yaml autoscales from min_replicas; with no load it stays there.
        replicas = load_config()["applications"][0]["deployments"][0]["autoscaling_config"]["min_replicas"]
        deadline = time.monotonic() + 120
        while True:
            names = process_tree_cmdlines(proc.pid)
            running = sum("ServeReplica" in n for n in names)
            if running == replicas or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert running == replicas, names
        assert any("haproxy" in n for n in names), names
        # A cluster beside others (this one sits beside the session's) must keep off the ports
        # Serve uses machine-wide: the replicas' and the fallback proxy's are shared silently
        # through SO_REUSEPORT (testbed/cluster_ports.py).
        singles = {int(private_ports[name]) for name in SINGLE_PORTS}
        low, high = (int(private_ports[f"RAY_SERVE_DIRECT_INGRESS_{end}_GRPC_PORT"]) for end in ("MIN", "MAX"))
        deadline = time.monotonic() + 60
        while not singles <= (ports := listening_ports(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)  # the fallback proxy starts after the app answers
        assert singles <= ports and not ports & {8404, 9101, 9500, 8500}, (sorted(ports), private_ports)
        # Each replica's gRPC server in the block (Ray's own workers listen on random ports, so
        # Serve's default replica range cannot simply be checked empty).
        assert len([p for p in ports if low <= p < high]) == replicas, (sorted(ports), private_ports)
        # And on loopback: Ray's node address and every socket of the cluster.
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert node_addresses(tree) == {"127.0.0.1"}
        assert not sockets_off_loopback(tree)
    finally:
        stop_process_group(proc)

