"""visuomotor_chunk behind the serving `Policy` protocol."""

from __future__ import annotations

import numpy as np
import torch

from serve_app.checkpoint import Checkpoint, load_weights_strict
from serve_app.frames import Letterbox
from serve_app.observation import ObservationBatch
from serve_app.policies.visuomotor_chunk.configuration import POLICY_TYPE, VisuomotorChunkConfig
from serve_app.policies.visuomotor_chunk.modeling import VisuomotorChunkNet, prompt_word_ids


class VisuomotorChunk:
    def __init__(self, net: VisuomotorChunkNet, device: str):
        self.net = net.to(device).eval()
        self.device = torch.device(device)
        self.config = net.config
        self.spec = net.config.input_spec()
        self.frames = Letterbox((self.spec.image_height, self.spec.image_width))

    @torch.inference_mode()
    def predict(self, batch: ObservationBatch) -> np.ndarray:
        dev = self.device
        ids, offsets = prompt_word_ids(batch.prompts, self.config.prompt_buckets)
        normalized = self.net(
            torch.from_numpy(batch.images).to(dev, non_blocking=True),
            torch.from_numpy(batch.camera_mask).to(dev),
            torch.from_numpy(batch.state).to(dev),
            ids.to(dev),
            offsets.to(dev),
        )
        return self.net.unnormalize_actions(normalized).float().cpu().numpy()  # prefix rows: serve_app.rtc


def expected_weights(checkpoint: Checkpoint) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        net = VisuomotorChunkNet(VisuomotorChunkConfig.from_checkpoint(checkpoint))
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


PREPROCESSING = ("training",)  # the letterbox it is trained with (serve_app/frames.py)


def load(checkpoint: Checkpoint, device: str, preprocessing: str = "training") -> VisuomotorChunk:
    net = VisuomotorChunkNet(VisuomotorChunkConfig.from_checkpoint(checkpoint))
    load_weights_strict(net, checkpoint.weights_path, POLICY_TYPE)
    return VisuomotorChunk(net, device)


def save(net: VisuomotorChunkNet, directory, **train_config_extra) -> None:
    """Write a servable checkpoint directory: train_config.json + model.safetensors."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = net.config.to_train_config(**train_config_extra)
    (directory / "train_config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
