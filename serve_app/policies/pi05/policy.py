"""pi05 behind the serving `Policy` protocol.

    ObservationBatch (numpy, robot units)
      -> normalise state, build prompt ("Task: ..., State: ...;\\n"), tokenize
      -> VLM prefix pass once per batch (KV cache)
      -> num_steps Euler steps of the action expert, batched across robots
      -> unnormalise, delta -> absolute where configured (serve_app.rtc pins the RTC prefix rows afterwards)
      -> (B, chunk_size, action_dim) float32

Dtypes: float32 on CPU; bfloat16 on CUDA with SigLIP's patch and position
embeddings kept float32 (as OpenTau serves). Normalisation is float32 always.
`load` streams each tensor of model.safetensors straight into its device and
dtype, so the host never holds the network in float32 nor the file beside it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from serve_app.checkpoint import Checkpoint, CheckpointError, load_weights_strict
from serve_app.frames import OpenTauServerStretch, ResizeWithPad, unit_pixels
from serve_app.observation import Observation, ObservationBatch
from serve_app.policies.pi05.configuration import POLICY_TYPE, Pi05Config
from serve_app.policies.pi05.model import Pi05Model
from serve_app.policies.pi05.normalization import Normalizer, norm_head, stats_modules
from serve_app.policies.pi05.sampler import FlowSampler
from serve_app.policies.pi05.static_shapes import pad_rows, shapes_for
from serve_app.policies.pi05.tokenizer import PromptTokenizer, discretize_state, pi05_prompts

logger = logging.getLogger(__name__)
# Frame transforms (serve_app/frames.py), the default first: OpenTau's training resize, so a checkpoint sees
# its cameras as it did in training; "opentau_server" for checkpoints validated through OpenTau's own server.
PREPROCESSING = {"training": ResizeWithPad, "opentau_server": OpenTauServerStretch}
FP32_VISION_EMBEDDINGS = ("embeddings.patch_embedding.", "embeddings.position_embedding.")


class Pi05Network(nn.Module):
    """Everything in model.safetensors: the network (`model.*`) and the normalisation statistics."""

    def __init__(self, c: Pi05Config):
        super().__init__()
        self.config = c
        self.model = Pi05Model(c)
        for name, module in stats_modules(c, rows=len(c.dataset_names or ()) or 1).items():
            self.add_module(name, module)

    def stats_rows(self) -> int:
        return len(self.config.dataset_names or ()) or 1


class Pi05Policy:
    def __init__(
        self, net: Pi05Network, tokenizer: PromptTokenizer, device: str, head: int = 0, preprocessing: str = "training"
    ):
        self.config = c = net.config
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)  # a no-op after load(): the weights were streamed there
        self.model = self.net.model
        self.normalizer = Normalizer(c, dict(self.net.named_children()), head)
        self.tokenizer = tokenizer
        self.spec = c.input_spec()
        self.frames = PREPROCESSING[preprocessing]((self.spec.image_height, self.spec.image_width))
        self._markers = (tokenizer.encode("State: "), tokenizer.encode(":\n")) if c.state_type == "continuous" else None
        self._generator = torch.Generator(device=self.device).manual_seed(0)
        self.model.fuse_projections()  # the last step of loading: q|k|v, gate|up, adaRMS denses
        # CUDA: batches padded to a few sizes, the Euler loop replayed as one CUDA graph each; CPU: eager.
        self.shapes = shapes_for(FlowSampler(self.model), self.device, compile=c.use_torch_compile)

    @torch.inference_mode()
    def predict(self, batch: ObservationBatch, noise: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        c, dev = self.config, self.device
        b = len(batch)
        rows = self.shapes.rows(b)  # b, or the bucket b is padded to (static shapes)
        state = torch.from_numpy(batch.state).to(dev, torch.float32)  # (B, S) robot units
        state_n = self.normalizer.normalize_state(state)
        bins = discretize_state(state_n) if c.state_type == "discrete" else None
        tokens, token_mask = self.tokenizer(pi05_prompts(batch.prompts, bins))
        # Trailing padding every row shares is exact to drop, unless shapes must stay static.
        keep = tokens.shape[1] if self.shapes.static else max(int(token_mask.sum(1).max()), 1)
        tokens, token_mask = tokens[:, :keep].to(dev), token_mask[:, :keep].to(dev)

        pixels = unit_pixels(torch.from_numpy(batch.images).to(dev)).permute(0, 1, 4, 2, 3) * 2.0 - 1.0  # [-1, 1]
        # A camera the robot did not send is a black frame the model attends to, as in OpenTau's training data
        # and its server (pi05 never reads img_is_pad), so every camera slot is attended.
        cameras = torch.ones(batch.camera_mask.shape, dtype=torch.bool, device=dev)
        padded_state = nn.functional.pad(state_n, (0, c.max_state_dim - state_n.shape[1]))
        delay = torch.from_numpy(batch.delay).to(dev)
        raw_prefix = torch.from_numpy(batch.prefix).to(dev, torch.float32)  # (B, C, action_dim)
        action_prefix = self.normalizer.normalize_actions(self._to_delta(raw_prefix, state))
        action_prefix = nn.functional.pad(action_prefix, (0, c.max_action_dim - c.action_dim))
        if noise is None:
            shape = (b, c.chunk_size, c.max_action_dim)
            noise = torch.randn(shape, generator=self._generator, device=dev, dtype=torch.float32)
        noise = torch.as_tensor(noise, dtype=torch.float32, device=dev)
        inputs = (pixels, cameras, tokens, token_mask, padded_state, delay, action_prefix, noise)
        pixels, cameras, tokens, token_mask, padded_state, delay, action_prefix, noise = (
            pad_rows(t, rows) for t in inputs
        )

        prefix_embs, prefix_pad = self.model.embed_prefix(
            pixels, cameras, tokens, token_mask, padded_state, self._markers
        )
        cache = self.shapes.cache(rows, prefix_embs.shape[1])
        self.model.fill_kv_cache(prefix_embs, prefix_pad, cache)
        actions = self.shapes.sample(cache, prefix_pad, delay, action_prefix, noise)[:b, :, : c.action_dim]
        actions = self._to_absolute(self.normalizer.unnormalize_actions(actions), state)
        return actions.float().cpu().numpy()  # the prefix rows are pinned to what was sent by serve_app.rtc

    def warm_up(self, batch_sizes: tuple[int, ...] | None = None) -> None:
        """A blank predict per batch size (default: each bucket), so no robot's request pays a graph capture."""
        sizes = batch_sizes or getattr(self.shapes, "sizes", (1,))
        for rows in sorted({self.shapes.rows(b) for b in sizes}):
            self.predict(ObservationBatch.stack([Observation.blank(self.spec, self.frames.dtype)] * rows))

    def _delta_index(self, device):
        amap = self.config.delta_action_state_map
        a = sorted(amap)
        return torch.tensor(a, device=device), torch.tensor([amap[i] for i in a], device=device)

    def _to_delta(self, actions: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        if not self.config.delta_action_state_map:
            return actions
        a, s = self._delta_index(actions.device)
        out = actions.clone()
        out[..., a] -= state[:, None, s]
        return out

    def _to_absolute(self, actions: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        if not self.config.delta_action_state_map:
            return actions
        a, s = self._delta_index(actions.device)
        out = actions.clone()
        out[..., a] += state[:, None, s]
        return out


def serving_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of `name` (a Pi05Network state-dict name) in a network computing in `dtype`."""
    statistics = not name.startswith("model.")
    return torch.float32 if statistics or _keeps_float32(name) else dtype


def to_bf16_keeping_vision_embeddings(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not _keeps_float32(name):
            p.data = p.data.to(torch.bfloat16)


def _keeps_float32(name: str) -> bool:
    return any(k in name for k in FP32_VISION_EMBEDDINGS)


def expected_weights(checkpoint: Checkpoint) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        net = Pi05Network(Pi05Config.from_checkpoint(checkpoint))
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def load(
    checkpoint: Checkpoint, device: str, preprocessing: str = "training", dtype: torch.dtype | None = None
) -> Pi05Policy:
    """Strictly load a checkpoint onto `device`; compute `dtype` by default bfloat16 on CUDA, float32 elsewhere."""
    config = Pi05Config.from_checkpoint(checkpoint)
    where = str(checkpoint.config_path)
    for key, bad in (("delta_action_state_map", config.delta_action_state_map or {}),):
        if any(a >= config.action_dim or s >= config.state_dim for a, s in bad.items()):
            raise CheckpointError(f"{where}: policy.{key} {bad} points outside the action/state vectors")
    # The tokenizer first: a missing file fails in milliseconds, not after reading 7 GB.
    tokenizer = PromptTokenizer.locate(
        config.tokenizer_candidates(checkpoint.directory), config.prompt_max_length, config.arch.language.vocab_size
    )
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    with torch.device("meta"):
        net = Pi05Network(config)
    # One tensor at a time from the file into its place (OpenTau stores most of the VLM in bf16).
    load_weights_strict(net, checkpoint.weights_path, POLICY_TYPE, device, lambda name: serving_dtype(name, dtype))
    for name, buf in net.named_buffers():
        if torch.isinf(buf).any():
            raise CheckpointError(f"{checkpoint.weights_path}: normalisation statistic {name} is infinite")
    head = norm_head(config, net.stats_rows(), checkpoint.server_config, where)
    logger.info("pi05: tokenizer %s, norm head %d, device %s", tokenizer.path, head, device)
    return Pi05Policy(net, tokenizer, device, head, preprocessing)
