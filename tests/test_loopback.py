"""Every cluster the tests start keeps Ray's own traffic on 127.0.0.1 (tests send nothing elsewhere).

The session cluster here; the README's `serve run` in test_quickstart.py; a launcher-started
cluster in test_launcher.py; benchmark servers and notebook clusters start the same way
(testbed.cluster_ports.keep_ray_on_loopback).
"""

from __future__ import annotations

import os

import psutil
import pytest

from tests.conftest import node_addresses, sockets_off_loopback

pytestmark = pytest.mark.serve


def test_session_cluster_binds_ray_to_loopback(demo_app):
    import ray

    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    procs = [psutil.Process(os.getpid()), *psutil.Process(os.getpid()).children(recursive=True)]
    assert node_addresses(procs) == {"127.0.0.1"}
    bad = sockets_off_loopback(procs)
    assert not bad, bad
