"""The visuomotor_chunk network: one small CNN per camera, state and prompt, one MLP head.

    images (B, N, H, W, 3) uint8 --CameraEncoder x N--> (B, N * 2C) keypoints
    state  (B, S) normalised     --Linear-------------> (B, hidden)
    prompt word ids              --EmbeddingBag-------> (B, prompt_dim)
    concat --MLP--> (B, T * A) --> (B, T, A) normalised actions

Spatial-softmax keypoints make "where is the thing in the image" a direct
feature, which is what a reaching task needs from pixels.
"""

from __future__ import annotations

import re
import zlib

import torch
from torch import nn

from serve_app.policies.visuomotor_chunk.configuration import VisuomotorChunkConfig


class SpatialSoftmax(nn.Module):
    """(B, C, H, W) feature maps -> (B, 2C) expected x, y of each channel in [-1, 1]."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        attention = torch.softmax(features.flatten(2), dim=-1).view(b, c, h, w)
        ys = torch.linspace(-1.0, 1.0, h, device=features.device, dtype=features.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=features.device, dtype=features.dtype)
        x = (attention.sum(dim=2) * xs).sum(dim=-1)  # (B, C)
        y = (attention.sum(dim=3) * ys).sum(dim=-1)
        return torch.cat([x, y], dim=-1)


class CameraEncoder(nn.Module):
    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c_out in enumerate(channels):
            stride = 2 if i < len(channels) - 1 else 1
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1), nn.GroupNorm(1, c_out), nn.ReLU()]
            c_in = c_out
        self.conv = nn.Sequential(*layers)
        self.keypoints = SpatialSoftmax()
        self.out_dim = 2 * c_in

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.keypoints(self.conv(image))


def prompt_word_ids(prompts: list[str], buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash lower-cased words into buckets: (ids, offsets) for nn.EmbeddingBag.

    A tokenizer-free prompt encoding: deterministic, no vocabulary file to ship.
    """
    ids: list[int] = []
    offsets: list[int] = []
    for prompt in prompts:
        offsets.append(len(ids))
        ids.extend(zlib.crc32(w.encode()) % buckets for w in re.findall(r"[a-z0-9]+", prompt.lower()))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


class VisuomotorChunkNet(nn.Module):
    def __init__(self, config: VisuomotorChunkConfig):
        super().__init__()
        self.config = config
        self.cameras = nn.ModuleList(CameraEncoder(config.conv_channels) for _ in range(config.num_cams))
        image_dim = sum(cam.out_dim for cam in self.cameras)
        self.state_proj = nn.Linear(config.max_state_dim, config.hidden_dim)
        self.prompt = nn.EmbeddingBag(config.prompt_buckets, config.prompt_dim, mode="mean")
        self.head = nn.Sequential(
            nn.Linear(image_dim + config.hidden_dim + config.prompt_dim, config.hidden_dim),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_dim, config.hidden_dim),
            nn.ReLU(),
            nn.Linear(config.hidden_dim, config.action_chunk * config.max_action_dim),
        )
        # Normalisation statistics travel in model.safetensors with the weights.
        self.register_buffer("state_mean", torch.zeros(config.max_state_dim))
        self.register_buffer("state_std", torch.ones(config.max_state_dim))
        self.register_buffer("action_mean", torch.zeros(config.max_action_dim))
        self.register_buffer("action_std", torch.ones(config.max_action_dim))

    def forward(
        self,
        images: torch.Tensor,  # (B, N, H, W, 3) uint8
        camera_mask: torch.Tensor,  # (B, N) bool
        state: torch.Tensor,  # (B, S) float32, robot units
        prompt_ids: torch.Tensor,
        prompt_offsets: torch.Tensor,
    ) -> torch.Tensor:
        """Normalised actions, (B, T, A)."""
        pixels = images.permute(0, 1, 4, 2, 3).float().mul_(2.0 / 255.0).sub_(1.0)  # (B, N, 3, H, W)
        mask = camera_mask.to(pixels.dtype)
        feats = [enc(pixels[:, i]) * mask[:, i : i + 1] for i, enc in enumerate(self.cameras)]
        state_n = (state - self.state_mean) / self.state_std
        x = torch.cat([*feats, torch.relu(self.state_proj(state_n)), self.prompt(prompt_ids, prompt_offsets)], dim=-1)
        return self.head(x).view(-1, self.config.action_chunk, self.config.max_action_dim)

    def unnormalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return actions * self.action_std + self.action_mean

    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return (actions - self.action_mean) / self.action_std
