"""ROS 2 on loopback only, in a DDS domain of this process's own: for tests, benchmarks and notebooks.

Call `keep_ros_on_loopback()` before rclpy is first initialised (rclpy and Fast DDS read the
environment then); subprocesses inherit it, so a simulated robot started from a test talks to
that test's nodes and to nothing else.

- FASTDDS_DEFAULT_PROFILES_FILE: testbed/fastdds_loopback.xml, shared memory plus UDP bound to
  127.0.0.1, discovery by unicast to 127.0.0.1. ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST is not
  enough on Kilted: rmw_fastrtps then still opens sockets on every interface (measured with
  `ss -uanp`); with the profile and the range left at its default, every socket is on 127.0.0.1.
- ROS_DOMAIN_ID: one per process id, so concurrent test runs on one machine never see each other.
"""

from __future__ import annotations

import os
from pathlib import Path

PROFILE = Path(__file__).with_name("fastdds_loopback.xml")


def domain_for(pid: int) -> int:
    # 1..100: inside the range whose UDP ports every DDS vendor can compute (0..101), and not 0,
    # the default a stray ROS 2 process on this machine would be in.
    return 1 + pid % 100


def keep_ros_on_loopback(domain_id: int | None = None) -> dict[str, str]:
    values = {
        "ROS_DOMAIN_ID": str(domain_for(os.getpid()) if domain_id is None else domain_id),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "SYSTEM_DEFAULT",
        "FASTDDS_DEFAULT_PROFILES_FILE": str(PROFILE),
        "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp",
    }
    os.environ.update(values)
    return values
