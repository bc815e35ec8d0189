"""SigLIP vision tower and PaliGemma's projector, with Hugging Face's parameter names.

    pixels (B, 3, H, W) in [-1, 1]
      --patch_embedding (conv PxP, stride P) + position_embedding--> (B, N, Dv)   fp32 always
      --encoder layers (pre-LN attention + GELU-tanh MLP)-----------> (B, N, Dv)
      --post_layernorm--multi_modal_projector.linear----------------> (B, N, D)   D = LM hidden

N = (H / P)^2 = 256 for 224 px and P = 14. The patch and position embeddings
stay float32 when the rest of the tower runs in bf16, as OpenTau (and openpi)
do: they are the only float32-master tensors of the vision tower.

Attention is torch's scaled_dot_product_attention in the tower's dtype (its
fused kernels accumulate the softmax in fp32), as Hugging Face's SigLIP runs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.policies.pi05.configuration import VisionConfig
from serve_app.policies.pi05.gemma import fuse_linears


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class SiglipEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding(c.num_patches, c.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixels.to(weight.dtype))  # (B, Dv, H/P, W/P)
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight  # (B, N, Dv)


class SiglipAttention(nn.Module):
    """q_proj, k_proj, v_proj, out_proj as stored; `qkv_proj` (rows q | k | v) once fused."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.num_heads = c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, P, Dv): every patch attends to every patch of its image."""
        b, n, d = x.shape
        qkv = self.qkv_proj(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, P, dh)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, P, dh)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class SiglipMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = SiglipAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = SiglipMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(c) for _ in range(c.num_hidden_layers))

    def fuse_projections(self) -> None:
        """After loading: q|k|v into one `qkv_proj` per layer (see gemma.fuse_linears)."""
        for layer in self.layers:
            fuse_linears(layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj")


class SiglipVisionModel(nn.Module):
    """`vision_tower.vision_model` in PaliGemma's state dict."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(c)
        self.encoder = SiglipEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        dtype = self.post_layernorm.weight.dtype
        x = x.to(dtype)  # fp32 embeddings -> encoder dtype (a no-op in fp32)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.vision_model = SiglipVisionModel(c)


class MultiModalProjector(nn.Module):
    def __init__(self, vision_dim: int, projection_dim: int):
        super().__init__()
        self.linear = nn.Linear(vision_dim, projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
