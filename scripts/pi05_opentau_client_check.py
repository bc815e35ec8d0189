"""Ask a running server for a chunk with OpenTau 0.14.0's own PolicyClient (run with OpenTau's Python).

    serve run my_serve_config.yaml            # checkpoint: an OpenTau-written pi05 directory
    /work/opentau-venv/bin/python scripts/pi05_opentau_client_check.py --address 127.0.0.1:50051 --cameras 2 --state-dim 8

OpenTau's client module imports ROS 2 (rclpy, interfaces, sensor_msgs) at the top
for its ROS node; those modules are stubbed here, the PolicyClient class is OpenTau's unchanged.
"""

import argparse
import sys
import types

import numpy as np

for name in ("rclpy", "rclpy.node", "interfaces", "interfaces.msg", "sensor_msgs", "sensor_msgs.msg"):
    sys.modules.setdefault(name, types.ModuleType(name))
sys.modules["rclpy.node"].Node = object
sys.modules["interfaces.msg"].MotorCommands = sys.modules["interfaces.msg"].RawMotorCommand = object
sys.modules["sensor_msgs.msg"].JointState = object

from opentau.scripts.grpc.client import ClientConfig, PolicyClient


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--cameras", type=int, default=2)
    parser.add_argument("--state-dim", type=int, default=8)
    parser.add_argument("--prompt", default="pick up the cube")
    args = parser.parse_args()
    client = PolicyClient(ClientConfig(server_address=args.address, timeout_seconds=30))
    if not client.connect():
        print(f"FAILED: no server at {args.address}")
        return 1
    print("health", client.health_check())
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(args.cameras)]
    chunk, ms = client.get_action_chunk(images, rng.uniform(-1, 1, args.state_dim).astype(np.float32), args.prompt)
    print(f"chunk {chunk.shape} {chunk.dtype} finite={bool(np.isfinite(chunk).all())} in {ms:.1f} ms")
    print("row 0:", np.array2string(chunk[0], precision=4))
    return 0 if np.isfinite(chunk).all() else 1


if __name__ == "__main__":
    sys.exit(main())
