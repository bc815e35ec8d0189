"""Gemma decoder stacks: PaliGemma's language model and pi05's action expert.

The two stacks have the same depth, heads and head_dim and attend jointly: at
layer i the queries of whichever towers run attend to the keys and values of
both (the VLM prefix ones come from the KV cache during denoising). Each
tower keeps its own weights, widths and norms.

Shapes: B batch, L tokens, N = B * L token rows, H query heads, K kv heads
(multi-query: K = 1), d head_dim (256), D tower width (2048 VLM, 1024 expert).

Modules carry OpenTau's parameter names so checkpoints load strictly. After
loading, `fuse_stack` concatenates q|k|v and gate|up into one matrix each
(one matmul instead of three or two) and `fuse_modulations` the expert's
adaRMS denses into one; the originals are freed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.policies.pi05.configuration import GemmaConfig

BIG_NEG = -2.3819763e38  # the masked logit of big_vision / openpi / OpenTau


class RMSNorm(nn.Module):
    """Gemma RMSNorm: x / rms(x) * (1 + weight), computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_normalize(x, self.eps) * (1.0 + self.weight.float())).to(x.dtype)


class AdaRMSNorm(nn.Module):
    """Adaptive RMSNorm of the action expert: scale, shift and a residual gate from the flow time.

    cond (.., Dc) --dense--> (.., 3D) = scale | shift | gate
    y = x / rms(x) * (1 + scale) + shift; the gate multiplies the branch output
    before the residual add. The condition depends on the denoising step only:
    after loading every `dense` joins the stack's `modulation`, which the
    sampler evaluates for all steps at once (sampler.py).
    """

    def __init__(self, dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)


class GemmaAttentionProjections(nn.Module):
    """q_proj, k_proj, v_proj, o_proj as stored; `qkv_proj` (rows q | k | v) once fused."""

    def __init__(self, c: GemmaConfig):
        super().__init__()
        self.head_dim = c.head_dim
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)


class GemmaMLP(nn.Module):
    """gate_proj, up_proj, down_proj as stored; `gate_up_proj` (rows gate | up) once fused."""

    def __init__(self, c: GemmaConfig):
        super().__init__()
        self.intermediate_size = c.intermediate_size
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)


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


# --- after loading: fused projections ---------------------------------------------


def concat_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output rows are those of `parts`, in order (a copy: delete the parts after)."""
    weight = torch.cat([p.weight.detach() for p in parts])
    with torch.device("meta"):
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if parts[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    return fused


def fuse_linears(parent: nn.Module, names: tuple[str, ...], fused_name: str) -> None:
    """Replace `parent.<names>` by `parent.<fused_name>` = concat_linears; idempotent."""
    if not hasattr(parent, fused_name):
        parent.add_module(fused_name, concat_linears([getattr(parent, n) for n in names]))
        for n in names:
            delattr(parent, n)


def fuse_stack(stack: GemmaStack) -> None:
    for layer in stack.layers:
        fuse_linears(layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj")
        fuse_linears(layer.mlp, ("gate_proj", "up_proj"), "gate_up_proj")


def modulated_norms(stack: GemmaStack) -> list[AdaRMSNorm]:
    """The expert's adaptive norms in `stack.modulation`'s order: per layer input, post-attention; then final."""
    return [n for layer in stack.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)] + [stack.norm]


def fuse_modulations(stack: GemmaStack) -> None:
    """Every adaRMS `dense` of the expert as one Linear `stack.modulation` ((2 * layers + 1) * 3D outputs)."""
    if not hasattr(stack, "modulation"):
        norms = modulated_norms(stack)
        stack.modulation = concat_linears([n.dense for n in norms])
        for n in norms:
            del n.dense


# --- arithmetic shared by the prefix pass and the sampler -----------------------


def rms_normalize(x: torch.Tensor, eps: float | torch.Tensor, width: int | torch.Tensor | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) in fp32 (a bf16 x is upcast for the statistic, as Gemma does).

    The mean is sum / width, as torch computes `mean` on the CPU; the sampler
    passes eps and width as 0-d tensors so its hot loop wraps no Python scalars.
    """
    xf = x if x.dtype == torch.float32 else x.float()
    mean_square = (xf * xf).sum(-1, keepdim=True).div_(x.shape[-1] if width is None else width)
    return x * torch.rsqrt(mean_square.add_(eps))


def rope_tables(positions: torch.Tensor, head_dim: int, max_wavelength: float = 10_000.0):
    """Rotary tables for integer positions (B, L): cos and signed sin, each (B * L, 1, d) fp32.

    `apply_rope_` then computes x * cos + swap_halves(x) * sin, which is
    [x1 cos - x2 sin, x2 cos + x1 sin] term for term (the first half of `sin`
    is negated). Built once per predict, shared by every layer.
    """
    half = head_dim // 2
    exponents = (2.0 / head_dim) * torch.arange(half, dtype=torch.float32, device=positions.device)
    radians = positions.reshape(-1, 1, 1).float() / (max_wavelength**exponents)  # (N, 1, d/2)
    sin, cos = torch.sin(radians), torch.cos(radians)
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x (N, heads, d), a view into the qkv projection, in place; the arithmetic in fp32."""
    n, heads, d = x.shape
    xf = x if x.dtype == torch.float32 else x.float()
    swapped = xf.view(n, heads, 2, d // 2).flip(2).view(n, heads, d)  # [x2, x1]
    x.copy_(xf * cos + swapped * sin)  # (torch.compile takes no strided out= tensors)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool (B, Lq, Lk), True = attend -> additive (B, 1, Lq, Lk) in the attention's dtype: 0 or BIG_NEG.

    A finite BIG_NEG rather than -inf, as OpenTau masks: a query that may
    attend to nothing (a padding token) gets uniform weights, never NaN.
    """
    return torch.where(mask[:, None], 0.0, BIG_NEG).to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention: q (B, H, Lq, d), k/v (B, K, Lk, d), bias (B, 1, Lq, Lk) -> (B * Lq, H * d).

    One SDPA call, K/V heads shared by their query groups (no repeat). In fp32
    it is OpenTau's fp32 logits and softmax. In bf16 the inputs stay bf16 (the
    fused kernels accumulate logits and softmax in fp32 and multiply bf16
    weights into V, which is OpenTau's eager order); against OpenTau's bf16
    pi05 that measured 5.3e-3 of the chunk's range (upcasting to fp32: 5.6e-3).
    """
    b, h, lq, d = q.shape
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)  # (B, H, Lq, d)
    return out.transpose(1, 2).reshape(b * lq, h * d)


def gelu_tanh_glu(gate_up: torch.Tensor, width: int) -> torch.Tensor:
    """gelu_tanh(gate) * up for the fused (N, 2I) gate|up projection."""
    return F.gelu(gate_up[:, :width], approximate="tanh") * gate_up[:, width:]
