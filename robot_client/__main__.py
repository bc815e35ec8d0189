"""python -m robot_client: run a robot against a policy server.

Accepts the command line OpenTau documents for its client:
    python -m robot_client --server_address HOST:PORT --prompt "pick up the red block" \\
        --control_frequency 30 --num_cameras 2 --timeout 30
plus --api-key, --mode unary|stream, --robot replay|ros2, and --model / --robot_id for a server
that serves several policies (see --help).
Arguments after `--ros-args` go to rclpy untouched.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import threading

from robot_client.chunk_executor import MERGE_RULES
from robot_client.control_loop import HOLD_MODES, ControlLoop, LoopConfig
from robot_client.errors import PolicyError
from robot_client.policy_client import API_KEY_ENV, DEFAULT_MODE, MODES, STREAM_MAX_AGE_S, PolicyClient
from robot_client.robot import ObservationUnavailable

logger = logging.getLogger("robot_client")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m robot_client", description="Robot-side client for the policy server.")
    opentau = p.add_argument_group("OpenTau-compatible")
    opentau.add_argument("--server_address", default="localhost:50051", help="host:port of the policy server")
    opentau.add_argument("--prompt", required=True, help="language instruction for the policy")
    opentau.add_argument(
        "--control_frequency", type=float, default=None, help="control rate in Hz (default 30, or the ROS config's)"
    )
    opentau.add_argument("--num_cameras", type=int, default=2, help="camera images to send (default 2)")
    opentau.add_argument(
        "--timeout", type=float, default=30.0, help="gRPC deadline and server wait, seconds (default 30)"
    )
    ours = p.add_argument_group("robot_client")
    ours.add_argument(
        "--api-key", "--api_key", dest="api_key", default=None, help=f"x-api-key to send (default: env {API_KEY_ENV})"
    )
    ours.add_argument(
        "--tls-ca",
        "--tls_ca",
        dest="tls_ca",
        default=None,
        help="TLS: CA certificate (PEM) the server's certificate is signed by",
    )
    ours.add_argument(
        "--tls-cert", "--tls_cert", dest="tls_cert", default=None, help="mTLS: this robot's certificate (PEM)"
    )
    ours.add_argument(
        "--tls-key", "--tls_key", dest="tls_key", default=None, help="mTLS: this robot's private key (PEM)"
    )
    ours.add_argument(
        "--mode",
        choices=MODES,
        default=DEFAULT_MODE,
        help=f"unary: one call per chunk; stream: one bidirectional stream (default: {DEFAULT_MODE})",
    )
    ours.add_argument("--model", default=None, metavar="NAME",
                      help="which of the server's policies (a name from its args.checkpoints), sent as metadata "
                           "multiplexed_model_id on every call; default: the server's default policy")
    ours.add_argument("--robot_id", default=socket.gethostname(), metavar="ID",
                      help="this robot's name in the server's per-robot metrics, sent as metadata robot_id "
                           "(default: the hostname; '' sends none)")
    ours.add_argument("--stream_max_age", type=float, default=STREAM_MAX_AGE_S, metavar="S",
                      help="--mode stream: open a fresh stream between requests once one is this old, so a "
                           "server-side reload (HAProxy ingress) never cuts one mid-run")
    ours.add_argument(
        "--robot",
        choices=("auto", "replay", "ros2"),
        default="auto",
        help="robot port: ros2 (rclpy), replay (a recording, no robot); auto = ros2, an error if rclpy does not import",
    )
    ours.add_argument(
        "--replay_file", default=None, help="recording .npz for --robot replay (default: a synthetic scene)"
    )
    ours.add_argument("--replay_jpeg", action="store_true", help="replay frames as JPEG bytes (exercises pass-through)")
    ours.add_argument(
        "--ros_config", default=None, help="YAML settings of the ROS 2 adapter (topics, joints, types, rate)"
    )
    ours.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: run until Ctrl-C)")
    ours.add_argument(
        "--merge", choices=MERGE_RULES, default="replace", help="how overlapping actions of two chunks merge"
    )
    ours.add_argument(
        "--max_chunk_age",
        type=float,
        default=None,
        help="drop chunks older than this, s (default: one chunk's duration)",
    )
    ours.add_argument(
        "--watchdog_timeout",
        type=float,
        default=None,
        help="hold after this long without a fresh action, s (default: 2.5 periods)",
    )
    ours.add_argument(
        "--hold",
        choices=HOLD_MODES,
        default="stop",
        help="stop: the robot's own hold; last_position: keep commanding the last action",
    )
    ours.add_argument("--jpeg_quality", type=int, default=90)
    ours.add_argument("--stats_interval", type=float, default=10.0, help="seconds between stats log lines")
    ours.add_argument("--stats_json", default=None, help="write the final stats to this JSON file")
    ours.add_argument("--log_level", default="INFO")
    return p


def choose_robot(args, control_frequency_hint: float):
    kind = args.robot
    if kind == "auto":
        try:
            import rclpy  # noqa: F401
        except ImportError as err:
            # Never a replayed scene in place of the robot the operator meant to drive: say what is missing
            # (on one line: rclpy's own message for a broken install spans several).
            why = " ".join(str(err).split())
            raise ValueError(
                f"--robot auto: rclpy does not import ({why}); for a ROS 2 robot install the ROS 2 wheels "
                '(pip install "robot-policy-serve[ros2]") or source your ROS 2 install\'s setup.bash; '
                "for the replay robot (a recording, no robot) pass --robot replay"
            ) from None
        kind = "ros2"
        logger.info("--robot auto: using ros2")
    if kind == "ros2":
        from robot_client.ros2_node import Ros2Config, Ros2Robot

        if not args.ros_config:
            raise ValueError("--robot ros2 needs --ros_config FILE (topics, joint names, controller)")
        config = Ros2Config.from_yaml(args.ros_config)
        try:
            robot = Ros2Robot(config, ros_args=args.ros_args)
        except ImportError as err:
            raise ValueError(f"--robot ros2 needs rclpy ({err}); source your ROS 2 setup.bash first") from None
        return robot, robot.config.control_frequency
    from robot_client.replay_robot import Recording, ReplayRobot, synthetic_recording

    recording = (
        Recording.load(args.replay_file) if args.replay_file else synthetic_recording(num_cameras=args.num_cameras)
    )
    robot = ReplayRobot(
        recording, num_cameras=args.num_cameras, as_jpeg=args.replay_jpeg, jpeg_quality=args.jpeg_quality
    )
    return robot, control_frequency_hint


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ros_args = argv[argv.index("--ros-args") :] if "--ros-args" in argv else []
    args = parser().parse_args(argv[: len(argv) - len(ros_args)])
    args.ros_args = ["robot_client", *ros_args]
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # `kill` ends the run cleanly: hold, stats, exit
    robot = client = None
    try:
        client = PolicyClient(
            args.server_address,
            api_key=args.api_key,
            timeout_s=args.timeout,
            mode=args.mode,
            jpeg_quality=args.jpeg_quality,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            stream_max_age_s=args.stream_max_age,
            model=args.model,
            robot_id=args.robot_id,
        )
        robot, frequency = choose_robot(args, 30.0)
        config = LoopConfig(
            prompt=args.prompt,
            control_frequency=args.control_frequency or frequency,
            merge=args.merge,
            max_chunk_age_s=args.max_chunk_age,
            watchdog_timeout_s=args.watchdog_timeout,
            hold_mode=args.hold,
            stats_interval_s=args.stats_interval,
            max_action_age_s=getattr(robot, "max_action_age_s", None),  # the robot YAML's safety section
        )
        loop = ControlLoop.connect(robot, client, config, ready_timeout_s=args.timeout)
        logger.info("running at %.1f Hz, mode %s, merge %s", config.control_frequency, args.mode, args.merge)
        stats = loop.run(duration_s=args.duration or None, stop=stop)
        if args.stats_json:
            with open(args.stats_json, "w") as f:
                json.dump(stats.summary(), f, indent=2)
        return 0
    except (PolicyError, ObservationUnavailable, ValueError, FileNotFoundError) as err:
        print(f"robot_client: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        if client is not None:
            client.close()
        close = getattr(robot, "close", None)
        if close is not None:
            close()


if __name__ == "__main__":
    sys.exit(main())
