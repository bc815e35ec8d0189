"""The input spec the server advertises in HealthCheck, and the checks a robot runs against it.

Our server fills extension fields (numbered from 100) with the model's
cameras, resolution, dimensions and chunk length. OpenTau's own server leaves
them unset (zero): then the client skips the checks and sends what the robot
has, as OpenTau's client does.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from policy_wire import robot_inference_pb2 as pb
from policy_wire.input_spec import InputSpec
from robot_client.errors import IncompatibleServer


@dataclass(frozen=True)
class ServerSpec(InputSpec):
    """The input spec (policy_wire/input_spec.py: its one list of fields) plus who is serving it."""

    healthy: bool = False
    status: str = ""
    model_name: str = ""
    checkpoint_id: str = ""
    replica_id: str = ""
    warmed_up: bool = False

    @classmethod
    def from_health(cls, health: pb.HealthCheckResponse) -> ServerSpec:
        return cls(**{f.name: getattr(health, f.name) for f in fields(cls)})

    @property
    def advertised(self) -> bool:
        """False for a server that predates the spec fields (OpenTau's)."""
        return self.chunk_length > 0 and self.action_dim > 0

    @property
    def image_hw(self) -> tuple[int, int] | None:
        return (self.image_height, self.image_width) if self.image_height and self.image_width else None

    @property
    def ready(self) -> bool:
        # OpenTau's server never sets warmed_up; it only says healthy.
        return self.healthy and (self.warmed_up or not self.advertised)

    def same_model(self, other: ServerSpec) -> bool:
        """Could the loop built for this spec go on with `other` (same chunk shape and prefix limit)?"""
        return (self.action_dim, self.chunk_length, self.max_delay) == (
            other.action_dim,
            other.chunk_length,
            other.max_delay,
        )

    def check_robot(self, *, num_cameras: int, state_dim: int, prompt: str, joints: int = 0) -> None:
        """Refuse, before the robot moves, a robot this model cannot serve; say which knob is wrong."""
        if not self.advertised:
            return
        problems = []
        if num_cameras > self.num_cameras:
            problems.append(f"the robot sends {num_cameras} cameras, the model has {self.num_cameras} (--num_cameras)")
        if num_cameras < max(self.min_cameras, 0):
            problems.append(f"the robot sends {num_cameras} cameras, the model needs at least {self.min_cameras}")
        if state_dim > self.state_dim:
            problems.append(f"the robot state has {state_dim} values, the model takes at most {self.state_dim}")
        if state_dim == 0:
            problems.append("the robot state is empty")
        if joints > self.action_dim:
            problems.append(f"{joints} joints are commanded but the model's actions have {self.action_dim} values")
        if self.max_prompt_bytes and len(prompt.encode()) > self.max_prompt_bytes:
            problems.append(f"the prompt is {len(prompt.encode())} bytes, the limit is {self.max_prompt_bytes}")
        if problems:
            raise IncompatibleServer(
                f"model {self.model_name or '?'} (checkpoint {self.checkpoint_id or '?'}) cannot serve this robot: "
                + "; ".join(problems)
            )

    def describe(self) -> str:
        if not self.advertised:
            return f"{self.model_name or 'policy'} (no input spec advertised)"
        return (
            f"{self.model_name} checkpoint {self.checkpoint_id} on replica {self.replica_id}: "
            f"{self.num_cameras} cameras {self.image_width}x{self.image_height}, state {self.state_dim}, "
            f"action {self.action_dim}, chunk {self.chunk_length}, max delay {self.max_delay}"
        )
