"""Configuration of visuomotor_chunk, read from an OpenTau-layout train_config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from serve_app.checkpoint import Checkpoint, CheckpointError
from policy_wire.input_spec import InputSpec

POLICY_TYPE = "visuomotor_chunk"


@dataclass(frozen=True)
class VisuomotorChunkConfig:
    # Shared OpenTau keys (top level of train_config.json).
    num_cams: int = 2
    resolution: tuple[int, int] = (96, 96)
    max_state_dim: int = 32
    max_action_dim: int = 8
    action_chunk: int = 16
    # Architecture (train_config.json's `policy` section).
    conv_channels: tuple[int, ...] = (16, 32, 64, 64)
    hidden_dim: int = 256
    prompt_buckets: int = 1024
    prompt_dim: int = 32
    max_prompt_bytes: int = 2048
    dropout: float = 0.0

    def input_spec(self) -> InputSpec:
        return InputSpec(
            num_cameras=self.num_cams,
            min_cameras=self.num_cams,  # no camera dropout in training: every view is required
            image_height=self.resolution[0],
            image_width=self.resolution[1],
            state_dim=self.max_state_dim,
            action_dim=self.max_action_dim,
            chunk_length=self.action_chunk,
            max_delay=self.action_chunk,
            max_prompt_bytes=self.max_prompt_bytes,
        )

    def to_train_config(self, **extra) -> dict:
        """The train_config.json that describes this policy (written by training scripts)."""
        d = asdict(self)
        top = {k: d.pop(k) for k in ("num_cams", "resolution", "max_state_dim", "max_action_dim", "action_chunk")}
        top["resolution"] = list(top["resolution"])
        d["conv_channels"] = list(d["conv_channels"])
        return {**top, "policy": {"type": POLICY_TYPE, "pretrained_path": None, **d}, **extra}

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> "VisuomotorChunkConfig":
        resolution = checkpoint.require("resolution", list)
        if len(resolution) != 2 or not all(isinstance(v, int) and v > 0 for v in resolution):
            raise CheckpointError(f"{checkpoint.config_path}: 'resolution' must be [height, width], got {resolution!r}")
        policy = dict(checkpoint.policy_config)
        known = {f for f in cls.__dataclass_fields__} - {"num_cams", "resolution", "max_state_dim", "max_action_dim", "action_chunk"}
        arch = {k: v for k, v in policy.items() if k in known}
        for key in ("conv_channels",):
            if key in arch:
                arch[key] = tuple(arch[key])
        config = cls(
            num_cams=checkpoint.require("num_cams", int),
            resolution=(resolution[0], resolution[1]),
            max_state_dim=checkpoint.require("max_state_dim", int),
            max_action_dim=checkpoint.require("max_action_dim", int),
            action_chunk=checkpoint.require("action_chunk", int),
            **arch,
        )
        for key in ("num_cams", "max_state_dim", "max_action_dim", "action_chunk"):
            if getattr(config, key) <= 0:
                raise CheckpointError(f"{checkpoint.config_path}: {key!r} must be positive")
        return config
