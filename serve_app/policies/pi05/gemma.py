"""Gemma decoder stacks: PaliGemma's language model and pi05's action expert.

The two stacks have the same depth, heads and head_dim and attend jointly: at
layer i the queries of whichever towers run attend to the keys and values of
both (the VLM prefix ones come from the KV cache during denoising). Each
tower keeps its own weights, widths and norms.

Shapes: B batch, L tokens, H query heads, K kv heads (multi-query: K = 1),
d head_dim (256), D tower width (2048 VLM, 1024 expert).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.policies.pi05.configuration import GemmaConfig

BIG_NEG = -2.3819763e38  # the masked logit of big_vision / openpi / OpenTau


class RMSNorm(nn.Module):
    """Gemma RMSNorm: x / rms(x) * (1 + weight), computed in fp32. Returns (y, gate=None)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        normed = x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype), None


class AdaRMSNorm(nn.Module):
    """Adaptive RMSNorm of the action expert: scale, shift and a residual gate from `cond`.

    cond (B, L, Dc) --dense--> (B, L, 3D) = scale | shift | gate
    y = x / rms(x) * (1 + scale) + shift; the gate multiplies the branch output
    before the residual add.
    """

    def __init__(self, dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor):
        normed = x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps)
        scale, shift, gate = self.dense(cond).chunk(3, dim=-1)
        y = normed * (1 + scale.float()) + shift.float()
        return y.to(x.dtype), gate.to(x.dtype)


class GemmaAttentionProjections(nn.Module):
    def __init__(self, c: GemmaConfig):
        super().__init__()
        self.head_dim = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)


class GemmaMLP(nn.Module):
    def __init__(self, c: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaLayer(nn.Module):
    def __init__(self, c: GemmaConfig, cond_dim: int | None):
        super().__init__()
        self.self_attn = GemmaAttentionProjections(c)
        self.mlp = GemmaMLP(c)
        norm = (
            (lambda: AdaRMSNorm(c.hidden_size, cond_dim, c.rms_norm_eps))
            if cond_dim
            else (lambda: RMSNorm(c.hidden_size, c.rms_norm_eps))
        )
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()


class GemmaStack(nn.Module):
    """`language_model` (plain RMSNorm) or `gemma_expert.model` (adaptive RMSNorm).

    The VLM's token embedding is tied to `paligemma.lm_head.weight` and lives
    there (that is the name OpenTau's checkpoints store it under).
    """

    def __init__(self, c: GemmaConfig, cond_dim: int | None = None):
        super().__init__()
        self.layers = nn.ModuleList(GemmaLayer(c, cond_dim) for _ in range(c.num_hidden_layers))
        self.norm = (
            AdaRMSNorm(c.hidden_size, cond_dim, c.rms_norm_eps) if cond_dim else RMSNorm(c.hidden_size, c.rms_norm_eps)
        )


def apply_rope(x: torch.Tensor, positions: torch.Tensor, max_wavelength: float = 10_000.0) -> torch.Tensor:
    """Rotary embedding, computed in fp32. x (B, L, H, d), positions (B, L) int."""
    half = x.shape[-1] // 2
    dtype = x.dtype
    x = x.float()
    exponents = (2.0 / x.shape[-1]) * torch.arange(half, dtype=torch.float32, device=x.device)
    radians = positions[..., None].float() / (max_wavelength**exponents)  # (B, L, d/2)
    sin, cos = torch.sin(radians)[..., None, :], torch.cos(radians)[..., None, :]  # (B, L, 1, d/2)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked multi-query attention with fp32 logits and softmax.

    q (B, Lq, H, d), k/v (B, Lk, K, d), mask (B, Lq, Lk) bool (True = attend)
    -> (B, Lq, H * d) in v's dtype.
    """
    b, lq, h, d = q.shape
    groups = h // k.shape[2]
    q = q.float().transpose(1, 2)  # (B, H, Lq, d)
    k = k.float().repeat_interleave(groups, dim=2).transpose(1, 2)  # (B, H, Lk, d)
    v = v.repeat_interleave(groups, dim=2).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) * d**-0.5  # (B, H, Lq, Lk)
    logits = torch.where(mask[:, None], logits, BIG_NEG)
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    return (probs @ v).transpose(1, 2).reshape(b, lq, h * d)
