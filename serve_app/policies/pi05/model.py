"""The pi05 network: PaliGemma prefix and Gemma action expert (the sampler is sampler.py).

    images (B, N, 3, H, W) in [-1, 1] --SigLIP + projector--> (B, N*256, D)  ┐
    prompt ids (B, T)                 --embed * sqrt(D)-----> (B, T, D)      ┴ prefix (bidirectional)
    prefix --VLM, once per request batch--> KV cache: per layer (B, Lp + C, 2K, d), the prefix's K | V first
    x_t (B, C, A) noise, t = 1 --expert(x_t, t | KV cache) x num_steps--> v_t;  x_t += -1/num_steps * v_t
    -> (B, C, A) normalised actions (C = chunk_size, A = max_action_dim)

Real-time chunking: the first `delay` rows of x_t are pinned to the (normalised)
prefix and see flow time 0 at every step, as OpenTau trains them.

Module and parameter names reproduce OpenTau's state dict, so a checkpoint
loads with strict=True and no key remapping; `fuse_projections`, the last step
of loading, then merges q|k|v, gate|up and the expert's adaRMS denses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.policies.pi05.configuration import Pi05Config
from serve_app.policies.pi05.gemma import (
    GemmaStack,
    apply_rope_,
    attention,
    attention_bias,
    fuse_modulations,
    fuse_stack,
    gelu_tanh_glu,
    rope_tables,
)
from serve_app.policies.pi05.siglip import MultiModalProjector, VisionTower

KVCache = list[torch.Tensor]  # per layer (B, Lp + C, 2K, d): K | V of the prefix, then of the action tokens


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
    def vlm(self) -> GemmaStack:
        return self._pali.model.language_model

    @property
    def expert(self) -> GemmaStack:
        return self.paligemma_with_expert.gemma_expert.model

    @property
    def dtype(self) -> torch.dtype:
        return self.vlm.layers[0].mlp.down_proj.weight.dtype

    def fuse_projections(self) -> None:
        """After loading: q|k|v and gate|up into one matrix each, the expert's adaRMS denses into one.

        The state dict then no longer has OpenTau's names; this is the last
        step of loading (Pi05Policy does it), never before `load_state_dict`.
        """
        self._pali.model.vision_tower.vision_model.encoder.fuse_projections()
        fuse_stack(self.vlm)
        fuse_stack(self.expert)
        fuse_modulations(self.expert)

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

    def fill_kv_cache(self, prefix: torch.Tensor, pad: torch.Tensor, cache: KVCache) -> None:
        """Run the VLM over the prefix once and write every layer's K, V into `cache[i][:, :Lp]`.

        prefix (B, Lp, D), pad (B, Lp) bool; cache from `new_kv_cache` (the
        action tokens' K, V go behind the prefix while denoising, no copies).
        """
        b, lp, width = prefix.shape
        attn = self.vlm.layers[0].self_attn
        h, k, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        bias = attention_bias(pad[:, None, :] & pad[:, :, None], self.dtype)  # bidirectional among valid tokens
        cos, sin = rope_tables(pad.long().cumsum(dim=1) - 1, d)
        x = prefix.reshape(b * lp, width)  # the residual stream, token rows
        last = len(self.vlm.layers) - 1
        for i, layer in enumerate(self.vlm.layers):
            qkv = torch.mm(layer.input_layernorm(x), layer.self_attn.qkv_proj.weight.t()).view(b, lp, h + 2 * k, d)
            apply_rope_(qkv.view(b * lp, h + 2 * k, d)[:, : h + k], cos, sin)
            kv = cache[i][:, :lp]
            kv.copy_(qkv[:, :, h:])
            if i == last:
                break  # past the last K, V the VLM would only feed text generation
            q = qkv[:, :, :h].transpose(1, 2)
            attended = attention(q, kv[:, :, :k].transpose(1, 2), kv[:, :, k:].transpose(1, 2), bias)
            x = x + torch.mm(attended, layer.self_attn.o_proj.weight.t())
            gate_up = torch.mm(layer.post_attention_layernorm(x), layer.mlp.gate_up_proj.weight.t())
            x = x + torch.mm(gelu_tanh_glu(gate_up, layer.mlp.intermediate_size), layer.mlp.down_proj.weight.t())

    def new_kv_cache(self, batch: int, prefix_len: int) -> KVCache:
        """Per layer (B, Lp + C, 2K, d): the prefix's K | V, then room for the action tokens'."""
        attn = self.vlm.layers[0].self_attn
        shape = (batch, prefix_len + self.config.chunk_size, 2 * attn.num_kv_heads, attn.head_dim)
        device = self.vlm.layers[0].mlp.down_proj.weight.device
        return [torch.empty(shape, dtype=self.dtype, device=device) for _ in self.vlm.layers]
