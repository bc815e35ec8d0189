"""A robot port that replays recorded observations: the whole loop on a laptop, no robot.

A recording is an .npz file:
    images  (T, num_cameras, H, W, 3) uint8 RGB
    state   (T, state_dim) float32
    fps     ()  frames per second it was recorded at

The replayed frame follows wall-clock time (frame = elapsed * fps, looping),
as a live camera would. With `follow_commands` the first state values report
the last commanded action, as a perfect position-controlled arm would, so the
policy sees its own actions come back: a closed loop.

Make one:
    python -m robot_client.replay_robot synth --out demo.npz            # synthetic scene
    python -m robot_client.replay_robot record --ros_config robot.yaml --out rec.npz --seconds 10
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robot_client.image_codec import EncodedFrame, decode_frame, encode_jpeg
from robot_client.robot import Observation, ObservationUnavailable, RobotPort

logger = logging.getLogger("robot_client")


@dataclass
class Recording:
    images: np.ndarray  # (T, num_cameras, H, W, 3) uint8
    state: np.ndarray  # (T, state_dim) float32
    fps: float

    def __post_init__(self):
        self.images = np.asarray(self.images, dtype=np.uint8)
        self.state = np.asarray(self.state, dtype=np.float32)
        if self.images.ndim != 5 or self.images.shape[-1] != 3:
            raise ValueError(f"recording images must be (T, cameras, H, W, 3), got {self.images.shape}")
        if self.state.ndim != 2 or len(self.state) != len(self.images):
            raise ValueError(
                f"recording state must be (T, state_dim) with T={len(self.images)}, got {self.state.shape}"
            )
        if len(self.images) == 0 or self.fps <= 0:
            raise ValueError("recording needs at least one frame and fps > 0")

    @property
    def num_cameras(self) -> int:
        return self.images.shape[1]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        np.savez_compressed(path, images=self.images, state=self.state, fps=np.float64(self.fps))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Recording:
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(images=data["images"], state=data["state"], fps=float(data["fps"]))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"replay recording {path} does not exist; make one with "
                "`python -m robot_client.replay_robot synth --out demo.npz`"
            ) from None
        except KeyError as err:
            raise ValueError(
                f"{path}: not a robot_client recording (missing {err}; needs images, state, fps)"
            ) from None


def synthetic_recording(
    frames: int = 90,
    num_cameras: int = 2,
    height: int = 240,
    width: int = 320,
    state_dim: int = 14,
    fps: float = 30.0,
    seed: int = 0,
) -> Recording:
    """A scene with structure (gradient, a bright block moving across, per-camera tint) and smooth joints."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, 90)], -1)
    images = np.empty((frames, num_cameras, height, width, 3), np.uint8)
    side = max(4, min(height, width) // 6)
    for t in range(frames):
        for c in range(num_cameras):
            img = base.copy()
            img[..., 2] = (90 + 60 * c) % 256
            cx = int((t / max(frames - 1, 1)) * (width - side))
            cy = (height - side) // 2 + int(10 * np.sin(2 * np.pi * (t / frames + c / 3)))
            img[cy : cy + side, cx : cx + side] = 255
            images[t, c] = img
    phase = rng.uniform(0, 2 * np.pi, state_dim)
    t = np.arange(frames)[:, None] / fps
    state = (0.5 * np.sin(2 * np.pi * 0.25 * t + phase)).astype(np.float32)
    return Recording(images=images, state=state, fps=fps)


class ReplayRobot(RobotPort):
    def __init__(
        self,
        recording: Recording,
        *,
        num_cameras: int | None = None,
        follow_commands: bool = True,
        as_jpeg: bool = False,
        jpeg_quality: int = 90,
        clock=time.monotonic,
        keep: int = 100_000,
    ):
        cameras = recording.num_cameras if num_cameras is None else num_cameras
        if cameras > recording.num_cameras:
            raise ValueError(f"--num_cameras {cameras}: the recording has only {recording.num_cameras} cameras")
        self.recording = recording
        self.num_cameras = cameras
        self.follow_commands = follow_commands
        self.clock = clock
        # Pre-encoded frames exercise the client's JPEG pass-through, as a camera's compressed topic would.
        self._jpeg = (
            [
                [EncodedFrame(encode_jpeg(f, jpeg_quality), "jpeg") for f in frame[:cameras]]
                for frame in recording.images
            ]
            if as_jpeg
            else None
        )
        self._t0: float | None = None
        self._commanded: np.ndarray | None = None
        self._keep = keep
        self.applied: list[tuple[float, np.ndarray]] = []  # (time, action) for every apply_action
        self.holds: list[float] = []  # time of every hold()
        self.observations = 0

    def frame_index(self) -> int:
        now = self.clock()
        if self._t0 is None:
            self._t0 = now
        return int((now - self._t0) * self.recording.fps) % len(self.recording.images)

    def observe(self) -> Observation:
        i = self.frame_index()
        state = self.recording.state[i].copy()
        if self.follow_commands and self._commanded is not None:
            n = min(len(state), len(self._commanded))
            state[:n] = self._commanded[:n]
        images = self._jpeg[i] if self._jpeg is not None else list(self.recording.images[i, : self.num_cameras])
        self.observations += 1
        return Observation(images=list(images), state=state)

    def apply_action(self, action: np.ndarray) -> None:
        action = np.array(action, dtype=np.float32)
        self._commanded = action
        if len(self.applied) < self._keep:
            self.applied.append((self.clock(), action))

    def hold(self) -> None:
        if len(self.holds) < self._keep:
            self.holds.append(self.clock())


def record_observations(robot: RobotPort, seconds: float, fps: float) -> Recording:
    """Record any robot port (e.g. the ROS 2 adapter on a real robot) into a Recording for replay."""
    period, images, states = 1.0 / fps, [], []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        try:
            observation = robot.observe()
        except ObservationUnavailable as err:
            logger.info("waiting for sensors: %s", err)
        else:
            images.append(np.stack([decode_frame(f) for f in observation.images]))
            states.append(np.asarray(observation.state, np.float32))
        time.sleep(max(0.0, period - (time.monotonic() - started)))
    if not images:
        raise ObservationUnavailable(f"no complete observation in {seconds} s")
    return Recording(images=np.stack(images), state=np.stack(states), fps=fps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m robot_client.replay_robot", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write a synthetic recording")
    synth.add_argument("--out", required=True)
    synth.add_argument("--frames", type=int, default=90)
    synth.add_argument("--num_cameras", type=int, default=2)
    synth.add_argument("--height", type=int, default=240)
    synth.add_argument("--width", type=int, default=320)
    synth.add_argument("--state_dim", type=int, default=14)
    synth.add_argument("--fps", type=float, default=30.0)
    record = sub.add_parser("record", help="record a ROS 2 robot through the adapter")
    record.add_argument("--ros_config", required=True, help="YAML file of the ROS 2 adapter")
    record.add_argument("--out", required=True)
    record.add_argument("--seconds", type=float, default=10.0)
    record.add_argument("--fps", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "synth":
        rec = synthetic_recording(args.frames, args.num_cameras, args.height, args.width, args.state_dim, args.fps)
    else:
        from robot_client.ros2_node import Ros2Config, Ros2Robot

        robot = Ros2Robot(Ros2Config.from_yaml(args.ros_config))
        try:
            rec = record_observations(robot, args.seconds, args.fps)
        finally:
            robot.close()
    path = rec.save(args.out)
    print(
        f"wrote {path}: {len(rec.images)} frames, {rec.num_cameras} cameras {rec.images.shape[3]}x{rec.images.shape[2]}, "
        f"state dim {rec.state.shape[1]}, {rec.fps:g} fps"
    )


if __name__ == "__main__":
    main()
