"""pi05's flow-matching sampler: num_steps Euler steps of the action expert over the prefix KV cache.

    cache (filled by Pi05Model.fill_kv_cache), prefix pad mask, RTC delay, normalised action prefix, noise
      -> once per call: attention bias, RoPE tables, every step's adaRMS modulation (one matmul)
      -> per step: x_t pinned to the prefix on frozen rows; v_t = expert(x_t | cache); x_t += dt * v_t
      -> (B, C, A) float32 normalised actions

The action tokens' K, V are written behind the prefix's in the cache (no
concatenation), attention is torch's SDPA with grouped KV heads, and the loop
reads nothing but its tensor arguments and the weights and never waits on the
host: on CUDA one call is captured as one graph (cuda_graphs.py).

Real-time chunking: the first `delay` rows are pinned to the prefix and see
flow time 0 at every step, as OpenTau trains them. The flow times are the
float32 sequence 1, 1 + dt, ... that OpenTau's loop accumulates.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from serve_app.policies.pi05.gemma import (
    apply_rope_,
    attention,
    attention_bias,
    modulated_norms,
    rms_normalize,
    rope_tables,
)
from serve_app.policies.pi05.model import KVCache, Pi05Model


def sinusoidal_time_embedding(time: torch.Tensor, dim: int, min_period=4e-3, max_period=4.0) -> torch.Tensor:
    """Flow times (...) -> (..., dim), computed in float64 as OpenTau does on CPU and CUDA."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=time.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (1.0 / period * 2 * math.pi) * time[..., None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


def flow_times(num_steps: int) -> list[float]:
    """t_0 = 1, t_(s+1) = t_s + dt in float32 (OpenTau's loop), then 0: the time of frozen rows."""
    dt, t, times = np.float32(-1.0 / num_steps), np.float32(1.0), []
    for _ in range(num_steps):
        times.append(float(t))
        t = np.float32(t + dt)
    return times + [0.0]


class FlowSampler:
    """`sampler(cache, prefix_pad, delay, action_prefix, noise)` -> (B, C, A) float32."""

    def __init__(self, model: Pi05Model):
        self.model = model
        self.num_steps = model.config.num_steps
        self._constants: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def constants(self, device: torch.device):
        """Flow times (S + 1,), dt, rms eps and expert width as device tensors, made once (never while capturing)."""
        if device not in self._constants:
            expert = self.model.expert
            f32 = dict(dtype=torch.float32, device=device)
            self._constants[device] = (
                torch.tensor(flow_times(self.num_steps), **f32),
                torch.tensor(-1.0 / self.num_steps, **f32),
                torch.tensor(expert.norm.eps, **f32),
                torch.tensor(float(expert.layers[0].mlp.down_proj.weight.shape[0]), **f32),
            )
        return self._constants[device]

    def modulation_table(self, times: torch.Tensor) -> torch.Tensor:
        """(S + 1, norms, 3, 1, D) fp32: 1 + scale, shift, gate of every adaRMS norm at every flow time.

        The time MLP and all adaRMS denses depend on the step only: one batched
        matmul for the whole loop (gemma.fuse_modulations) instead of one per
        norm per step per token. The last row is t = 0, the frozen rows' time.
        """
        m = self.model
        t_emb = sinusoidal_time_embedding(times, m.config.proj_width).to(m.dtype)  # (S + 1, W)
        cond = F.silu(m.time_mlp_out(F.silu(m.time_mlp_in(t_emb))))
        norms = len(modulated_norms(m.expert))
        mod = m.expert.modulation(cond).view(times.shape[0], norms, 3, -1).float()
        table = torch.cat([1 + mod[:, :, :1], mod[:, :, 1:]], dim=2)  # 1 + scale | shift | gate
        return table[:, :, :, None, :]

    def __call__(
        self,
        cache: KVCache,  # per layer (B, Lp + C, 2K, d); [:, :Lp] filled by the prefix pass
        prefix_pad: torch.Tensor,  # (B, Lp) bool
        delay: torch.Tensor,  # (B,) int64: rows pinned to the prefix
        action_prefix: torch.Tensor,  # (B, C, A) float32 normalised, zero past the prefix
        noise: torch.Tensor,  # (B, C, A) float32
    ) -> torch.Tensor:
        m = self.model
        expert, dtype = m.expert, m.dtype
        attn, mlp = expert.layers[0].self_attn, expert.layers[0].mlp
        h, k, d, width = attn.num_heads, attn.num_kv_heads, attn.head_dim, mlp.intermediate_size
        b, chunk, _ = noise.shape
        lp, n, dev = prefix_pad.shape[1], b * chunk, noise.device
        times, dt, eps, hidden = self.constants(dev)  # 0-d tensors: no Python scalars wrapped per op
        cast = (lambda t: t) if dtype == torch.float32 else (lambda t: t.to(dtype))  # no no-op casts in the loop

        # Once per call: masks, positions, modulations, and views of the buffers the loop writes.
        frozen = torch.arange(chunk, device=dev)[None, :] < delay[:, None]  # (B, C)
        frozen_x, frozen_rows = frozen[:, :, None], frozen.reshape(1, n, 1)
        attend = torch.cat([prefix_pad[:, None, :].expand(b, chunk, lp), frozen_x.new_ones(b, chunk, chunk)], dim=2)
        bias = attention_bias(attend, dtype)  # (B, 1, C, Lp + C): the valid prefix and every action token
        cos, sin = rope_tables(prefix_pad.sum(dim=1, keepdim=True) + torch.arange(chunk, device=dev)[None], d)
        table = self.modulation_table(times)  # (S + 1, 2L + 1, 3, 1, D)
        step_rows = [rows.unbind(0) for rows in table.unbind(0)]  # [s][norm] (3, 1, D)
        layers = [
            (
                layer.self_attn.qkv_proj.weight.t(),
                layer.self_attn.o_proj.weight.t(),
                layer.mlp.gate_up_proj.weight.t(),
                layer.mlp.down_proj.weight.t(),
                kv[:, lp:],  # the action tokens' K | V slots
                kv[:, :, :k].transpose(1, 2),  # (B, K, Lp + C, d)
                kv[:, :, k:].transpose(1, 2),
            )
            for layer, kv in zip(expert.layers, cache)
        ]
        mod = torch.empty(3, n, table.shape[-1], device=dev)  # this norm's 1 + scale | shift | gate per token
        scale1, shift, gate = mod.unbind(0)
        qkv = torch.empty(n, (h + 2 * k) * d, dtype=dtype, device=dev)
        qkv_heads = qkv.view(b, chunk, h + 2 * k, d)
        q, new_kv = qkv_heads[:, :, :h].transpose(1, 2), qkv_heads[:, :, h:]  # (B, H, C, d), (B, C, 2K, d)
        rotated = qkv.view(n, h + 2 * k, d)[:, : h + k]  # q and k heads, rotated in place
        gate_up = torch.empty(n, 2 * width, dtype=dtype, device=dev)
        gelu_in, up = gate_up[:, :width], gate_up[:, width:]
        final = len(step_rows[0]) - 1

        def modulated(x: torch.Tensor, step: int, norm: int) -> torch.Tensor:
            """adaRMS: the rows' modulation (time 0 where frozen) into `mod`, then x / rms(x) * (1 + scale) + shift."""
            torch.where(frozen_rows, step_rows[-1][norm], step_rows[step][norm], out=mod)
            return cast(rms_normalize(x, eps, hidden) * scale1 + shift)

        x_t = noise
        for step in range(self.num_steps):
            x_t = torch.where(frozen_x, action_prefix, x_t)
            x = F.linear(cast(x_t.reshape(n, -1)), m.action_in_proj.weight, m.action_in_proj.bias)
            if m.config.use_modality_embedding:
                x = x + m.action_modality_embedding.weight.to(x.dtype)
            for i, (w_qkv, w_o, w_gate_up, w_down, slots, keys, values) in enumerate(layers):
                torch.mm(modulated(x, step, 2 * i), w_qkv, out=qkv)
                apply_rope_(rotated, cos, sin)
                slots.copy_(new_kv)
                x = x + torch.mm(attention(q, keys, values, bias), w_o) * cast(gate)
                torch.mm(modulated(x, step, 2 * i + 1), w_gate_up, out=gate_up)
                x = x + torch.mm(F.gelu(gelu_in, approximate="tanh") * up, w_down) * cast(gate)
            v_t = F.linear(modulated(x, step, final), m.action_out_proj.weight, m.action_out_proj.bias)
            x_t = x_t + dt * (v_t if v_t.dtype == torch.float32 else v_t.float()).view(b, chunk, -1)
        return torch.where(frozen_x, action_prefix, x_t)
