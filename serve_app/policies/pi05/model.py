"""The pi05 network: PaliGemma prefix, Gemma action expert, flow-matching sampler.

    images (B, N, 3, H, W) in [-1, 1] --SigLIP + projector--> (B, N*256, D)  ┐
    prompt ids (B, T)                 --embed * sqrt(D)-----> (B, T, D)      ┴ prefix (bidirectional)
    prefix --VLM, once per request batch--> KV cache (one K, V per layer)
    x_t (B, C, A) noise, t = 1 --expert(x_t, t | KV cache) x num_steps--> v_t;  x_t += -1/num_steps * v_t
    -> (B, C, A) normalised actions (C = chunk_size, A = max_action_dim)

Real-time chunking: the first `delay` rows of x_t are pinned to the (normalised)
prefix and see flow time 0 at every step, as OpenTau trains them.

Module and parameter names reproduce OpenTau's state dict, so a checkpoint
loads with strict=True and no key remapping.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.policies.pi05.configuration import Pi05Config
from serve_app.policies.pi05.gemma import GemmaStack, apply_rope, attention
from serve_app.policies.pi05.siglip import MultiModalProjector, VisionTower

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V (B, Lp, K, d)


class PaliGemmaModel(nn.Module):
    def __init__(self, c: Pi05Config):
        super().__init__()
        a = c.arch
        self.vision_tower = VisionTower(a.vision)
        self.multi_modal_projector = MultiModalProjector(a.vision.hidden_size, a.projection_dim)
        self.language_model = GemmaStack(a.language)


class TiedEmbedding(nn.Module):
    """PaliGemma's lm_head, whose weight is also the token embedding table (V, D)."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab, dim))


class PaliGemma(nn.Module):
    def __init__(self, c: Pi05Config):
        super().__init__()
        self.model = PaliGemmaModel(c)
        self.lm_head = TiedEmbedding(c.arch.language.vocab_size, c.arch.language.hidden_size)


class GemmaExpert(nn.Module):
    def __init__(self, c: Pi05Config):
        super().__init__()
        self.model = GemmaStack(c.arch.expert, cond_dim=c.proj_width)


class PaliGemmaWithExpert(nn.Module):
    def __init__(self, c: Pi05Config):
        super().__init__()
        self.paligemma = PaliGemma(c)
        self.gemma_expert = GemmaExpert(c)
        # Training-only heads (FAST discrete actions); kept so checkpoints load strictly.
        lm_width = c.arch.language.hidden_size
        self.discrete_action_embedding = nn.Embedding(c.discrete_action_vocab_size, lm_width)
        self.da_head = nn.Linear(lm_width, c.discrete_action_vocab_size)


def sinusoidal_time_embedding(time: torch.Tensor, dim: int, min_period=4e-3, max_period=4.0) -> torch.Tensor:
    """(B, C) flow times -> (B, C, dim), computed in float64 as OpenTau does on CPU and CUDA."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=time.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (1.0 / period * 2 * math.pi)[None, None, :] * time[..., None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


class Pi05Model(nn.Module):
    """`model.*` in the checkpoint. Compute dtype: that of the Gemma weights."""

    def __init__(self, c: Pi05Config):
        super().__init__()
        self.config = c
        self.paligemma_with_expert = PaliGemmaWithExpert(c)
        if c.state_type == "continuous":
            self.state_proj = nn.Linear(c.max_state_dim, c.arch.language.hidden_size)
        self.action_in_proj = nn.Linear(c.max_action_dim, c.proj_width)
        self.action_out_proj = nn.Linear(c.proj_width, c.max_action_dim)
        self.time_mlp_in = nn.Linear(c.proj_width, c.proj_width)
        self.time_mlp_out = nn.Linear(c.proj_width, c.proj_width)
        if c.use_modality_embedding:
            self.modality_embedding = nn.Embedding(5, c.arch.language.hidden_size)  # vision, language, ...
            self.action_modality_embedding = nn.Embedding(1, c.proj_width)

    # --- towers --------------------------------------------------------------

    @property
    def _pali(self) -> PaliGemma:
        return self.paligemma_with_expert.paligemma

    @property
    def _vlm(self) -> GemmaStack:
        return self._pali.model.language_model

    @property
    def _expert(self) -> GemmaStack:
        return self.paligemma_with_expert.gemma_expert.model

    @property
    def dtype(self) -> torch.dtype:
        return self._vlm.layers[0].self_attn.q_proj.weight.dtype

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        table = self._pali.lm_head.weight
        return F.embedding(ids, table) * math.sqrt(table.shape[-1])

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, H, W) -> (B, N * P, D); cameras are encoded as one batch."""
        b, _n = pixels.shape[:2]
        tower = self._pali.model.vision_tower.vision_model
        feats = self._pali.model.multi_modal_projector(tower(pixels.flatten(0, 1)))  # (B*N, P, D)
        return feats.to(self.dtype).reshape(b, -1, feats.shape[-1])

    # --- prefix --------------------------------------------------------------

    def embed_prefix(
        self,
        pixels: torch.Tensor,  # (B, N, 3, H, W) in [-1, 1]
        camera_mask: torch.Tensor,  # (B, N) bool
        tokens: torch.Tensor,  # (B, T) prompt ids
        token_mask: torch.Tensor,  # (B, T) bool
        state: torch.Tensor | None,  # (B, max_state_dim) normalised; continuous state_type only
        state_marker_ids: tuple[list[int], list[int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix embeddings (B, Lp, D) and their pad mask (B, Lp). All prefix tokens attend to each other."""
        b = pixels.shape[0]
        images = self.embed_images(pixels)
        per_image = images.shape[1] // pixels.shape[1]
        parts = [images, self.embed_tokens(tokens)]
        masks = [camera_mask.repeat_interleave(per_image, dim=1), token_mask]
        slots = [0] * images.shape[1] + [1] * tokens.shape[1]
        if self.config.state_type == "continuous":
            opening, closing = state_marker_ids
            ids = lambda seq: torch.tensor([seq] * b, device=tokens.device)
            state_emb = self.state_proj(state.to(self.dtype))[:, None]  # (B, 1, D)
            for piece in (self.embed_tokens(ids(opening)), state_emb, self.embed_tokens(ids(closing))):
                parts.append(piece)
                masks.append(torch.ones(b, piece.shape[1], dtype=torch.bool, device=tokens.device))
                slots += [2] * piece.shape[1]
        embs = torch.cat(parts, dim=1)
        if self.config.use_modality_embedding:
            slot_ids = torch.tensor(slots, device=embs.device)
            embs = embs + self.modality_embedding(slot_ids).to(embs.dtype)[None]
        return embs, torch.cat(masks, dim=1)

    def fill_kv_cache(self, prefix: torch.Tensor, pad: torch.Tensor) -> KVCache:
        """Run the VLM over the prefix once; keep every layer's K and V for the expert."""
        mask = pad[:, None, :] & pad[:, :, None]  # (B, Lp, Lp): bidirectional among valid tokens
        positions = pad.long().cumsum(dim=1) - 1
        x = prefix
        cache: KVCache = []
        for layer in self._vlm.layers:
            h, _ = layer.input_layernorm(x)
            q, k, v = self._qkv(layer, h)
            q, k = apply_rope(q, positions), apply_rope(k, positions)
            cache.append((k, v))
            x = x + self._out(layer, attention(q, k, v, mask))
            h, _ = layer.post_attention_layernorm(x)
            x = x + layer.mlp(h)
        # The VLM's final norm and lm_head would only feed text generation: skipped.
        return cache

    # --- action expert -----------------------------------------------------

    def embed_suffix(self, x_t: torch.Tensor, time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t (B, C, A), time (B, C) -> action tokens (B, C, W) and adaRMS condition (B, C, W)."""
        dtype = self.dtype
        tokens = self.action_in_proj(x_t.to(dtype))
        if self.config.use_modality_embedding:
            tokens = tokens + self.action_modality_embedding.weight.to(tokens.dtype)
        t_emb = sinusoidal_time_embedding(time, self.config.proj_width).to(dtype)
        cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(t_emb))))
        return tokens, cond

    def velocity(self, cache: KVCache, prefix_pad: torch.Tensor, x_t: torch.Tensor, time: torch.Tensor):
        """One expert pass: v_t (B, C, A) float32. Action tokens attend to the valid prefix and to each other."""
        x, cond = self.embed_suffix(x_t, time)
        b, c = x.shape[:2]
        suffix_pad = torch.ones(b, c, dtype=torch.bool, device=x.device)
        mask = torch.cat([prefix_pad[:, None, :].expand(b, c, -1), suffix_pad[:, None, :].expand(b, c, c)], dim=2)
        positions = prefix_pad.sum(dim=1, keepdim=True) + torch.arange(c, device=x.device)[None]  # (B, C)
        for layer, (k_prefix, v_prefix) in zip(self._expert.layers, cache):
            h, gate = layer.input_layernorm(x, cond)
            q, k, v = self._qkv(layer, h)
            q, k = apply_rope(q, positions), apply_rope(k, positions)
            k, v = torch.cat([k_prefix, k], dim=1), torch.cat([v_prefix, v], dim=1)
            x = x + self._out(layer, attention(q, k, v, mask)) * gate
            h, gate = layer.post_attention_layernorm(x, cond)
            x = x + layer.mlp(h) * gate
        x, _ = self._expert.norm(x, cond)
        return self.action_out_proj(x).float()

    def _qkv(self, layer, h: torch.Tensor):
        attn = layer.self_attn
        shape = (*h.shape[:-1], -1, attn.head_dim)
        h = h.to(self.dtype)
        return attn.q_proj(h).view(shape), attn.k_proj(h).view(shape), attn.v_proj(h).view(shape)

    def _out(self, layer, attended: torch.Tensor) -> torch.Tensor:
        return layer.self_attn.o_proj(attended.to(self.dtype))

    # --- sampling ----------------------------------------------------------

    def sample_actions(
        self,
        cache: KVCache,
        prefix_pad: torch.Tensor,  # (B, Lp)
        noise: torch.Tensor,  # (B, C, A) float32
        action_prefix: torch.Tensor,  # (B, C, A) normalised, zero past the prefix
        delay: torch.Tensor,  # (B,) int64
    ) -> torch.Tensor:
        """Euler integration of the flow from t = 1 (noise) to t = 0 (actions): (B, C, A) float32."""
        c = noise.shape[1]
        frozen = torch.arange(c, device=noise.device)[None, :] < delay[:, None]  # (B, C)
        frozen3 = frozen[..., None]
        dt = torch.tensor(-1.0 / self.config.num_steps, dtype=torch.float32, device=noise.device)
        time = torch.tensor(1.0, dtype=torch.float32, device=noise.device)
        x_t = noise
        for _ in range(self.config.num_steps):  # t = 1, 1 + dt, ...: the same float32 sequence as OpenTau
            x_t = torch.where(frozen3, action_prefix, x_t)
            v_t = self.velocity(cache, prefix_pad, x_t, torch.where(frozen, 0.0, time))
            x_t = x_t + dt * v_t
            time = time + dt
        return torch.where(frozen3, action_prefix, x_t)
