"""The input spec: what a policy accepts, advertised in HealthCheck (fields 100-113).

Hand-written, beside the generated stubs, because both sides read it: the server
builds its HealthCheckResponse from it, the robot configures itself from it. The
field names are the HealthCheckResponse field names; this class is their only list.
A server that predates the spec (OpenTau's) leaves them zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class InputSpec:
    num_cameras: int = 0
    min_cameras: int = 0  # fewest camera images a request may carry; missing ones are padded
    image_height: int = 0
    image_width: int = 0
    state_dim: int = 0
    action_dim: int = 0
    chunk_length: int = 0
    max_delay: int = 0  # largest `delay` accepted with a prefix_action
    max_prompt_bytes: int = 2048  # UTF-8 bytes

    def health_fields(self) -> dict[str, int]:
        """Keyword arguments for HealthCheckResponse."""
        return asdict(self)
