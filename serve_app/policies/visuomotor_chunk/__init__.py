"""visuomotor_chunk: a compact CNN-per-camera policy that regresses a whole action chunk.

Small enough to train on a CPU in minutes, and cheap enough per sample that
batching many robots into one forward pass pays off.
"""

from serve_app.policies.visuomotor_chunk.configuration import VisuomotorChunkConfig
from serve_app.policies.visuomotor_chunk.modeling import VisuomotorChunkNet
from serve_app.policies.visuomotor_chunk.policy import PREPROCESSING, VisuomotorChunk, expected_weights, load, save

__all__ = ["PREPROCESSING", "VisuomotorChunkConfig", "VisuomotorChunk", "VisuomotorChunkNet", "expected_weights", "load", "save"]
