"""Configuration of pi05, read from an OpenTau train_config.json.

The serving-relevant part of OpenTau's `PI05Config` (policy section) plus the
pipeline keys at the top level. OpenTau hard-codes the network sizes (PaliGemma
3B + a 300M Gemma action expert); `Pi05Architecture` holds them, and a
checkpoint may override them with `policy.paligemma_config` /
`policy.gemma_expert_config` (the argument names of OpenTau's
`PaliGemmaWithExpertConfig`). Only tiny test checkpoints do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from serve_app.checkpoint import Checkpoint, CheckpointError
from policy_wire.input_spec import InputSpec

POLICY_TYPE = "pi05"
NORM_MODES = ("IDENTITY", "MEAN_STD", "MIN_MAX", "QUANTILE")
LEGACY_EPS = 1e-8  # config_version 0
OPENPI_EPS = 1e-6  # config_version >= 1


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP so400m/14 as PaliGemma-3B-224 uses it."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class GemmaConfig:
    """One Gemma decoder stack. Defaults: Gemma-2B, PaliGemma's language model."""

    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_hidden_layers: int = 18
    num_attention_heads: int = 8
    num_key_value_heads: int = 1
    head_dim: int = 256
    vocab_size: int = 257152
    rms_norm_eps: float = 1e-6


# pi05's action expert: Gemma-300M with adaptive RMSNorm conditioned on the flow time.
EXPERT_DEFAULT = GemmaConfig(hidden_size=1024, intermediate_size=4096)


@dataclass(frozen=True)
class Pi05Architecture:
    vision: VisionConfig = VisionConfig()
    projection_dim: int = 2048  # multi_modal_projector output = language hidden size
    language: GemmaConfig = GemmaConfig()
    expert: GemmaConfig = EXPERT_DEFAULT

    def check(self, where: str) -> None:
        lm, ex = self.language, self.expert
        problems = []
        if (lm.num_hidden_layers, lm.num_attention_heads, lm.num_key_value_heads, lm.head_dim) != (
            ex.num_hidden_layers,
            ex.num_attention_heads,
            ex.num_key_value_heads,
            ex.head_dim,
        ):
            problems.append("language model and action expert must share layers, heads and head_dim")
        if lm.num_attention_heads % lm.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.projection_dim != lm.hidden_size:
            problems.append("projection_dim must equal the language model's hidden_size")
        if self.vision.hidden_size % self.vision.num_attention_heads:
            problems.append("vision hidden_size must be a multiple of its num_attention_heads")
        if problems:
            raise CheckpointError(f"{where}: inconsistent pi05 architecture: " + "; ".join(problems))


@dataclass(frozen=True)
class Feature:
    type: str  # VISUAL / STATE / ACTION
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Pi05Config:
    # Pipeline keys (top level of train_config.json).
    num_cams: int = 2
    resolution: tuple[int, int] = (224, 224)
    max_state_dim: int = 32
    max_action_dim: int = 32
    chunk_size: int = 50
    # Policy section (OpenTau's PI05Config names).
    input_features: dict[str, Feature] = field(default_factory=dict)
    output_features: dict[str, Feature] = field(default_factory=dict)
    normalization_mapping: dict[str, str] = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    )
    state_type: str = "discrete"
    prompt_max_length: int = 256
    proj_width: int = 1024
    num_steps: int = 10
    max_delay: int = 0
    empty_cameras: int = 0
    use_modality_embedding: bool = False
    delta_action_state_map: dict[int, int] | None = None
    config_version: int = 0  # absent in the checkpoint = pre-versioning (legacy), as OpenTau resolves it
    dataset_names: tuple[str, ...] | None = None
    dataset_to_norm_index: dict[str, int] | None = None
    use_torch_compile: bool = False
    # Keys OpenTau does not have.
    discrete_action_vocab_size: int = 2048  # FAST tokenizer vocabulary: sizes two unused training heads
    tokenizer_path: str | None = None
    arch: Pi05Architecture = Pi05Architecture()

    # --- derived -----------------------------------------------------------

    @property
    def state_key(self) -> str:
        return _only(self.input_features, "STATE")

    @property
    def action_key(self) -> str:
        return _only(self.output_features, "ACTION")

    @property
    def state_dim(self) -> int:
        return self.input_features[self.state_key].shape[0]

    @property
    def action_dim(self) -> int:
        return self.output_features[self.action_key].shape[0]

    @property
    def norm_eps(self) -> float:
        return OPENPI_EPS if self.config_version >= 1 else LEGACY_EPS

    @property
    def zero_range_center(self) -> bool:
        return self.config_version >= 1

    def input_spec(self) -> InputSpec:
        return InputSpec(
            num_cameras=self.num_cams,
            min_cameras=1,  # a missing camera is masked out, as OpenTau's empty cameras are
            image_height=self.resolution[0],
            image_width=self.resolution[1],
            state_dim=self.state_dim,
            action_dim=self.action_dim,
            chunk_length=self.chunk_size,
            max_delay=self.max_delay,
        )

    # --- reading -----------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> Pi05Config:
        where = str(checkpoint.config_path)
        policy = checkpoint.policy_config
        resolution = checkpoint.require("resolution", list)
        if len(resolution) != 2 or not all(isinstance(v, int) and v > 0 for v in resolution):
            raise CheckpointError(f"{where}: 'resolution' must be [height, width], got {resolution!r}")
        if policy.get("predict_response"):
            raise CheckpointError(f"{where}: policy.predict_response=true (subtask text generation) is not served")
        if int(policy.get("n_obs_steps", 1)) != 1:
            raise CheckpointError(f"{where}: policy.n_obs_steps must be 1")
        chunk = checkpoint.require("action_chunk", int)
        if "chunk_size" in policy and policy["chunk_size"] != chunk:
            raise CheckpointError(
                f"{where}: action_chunk={chunk} but policy.chunk_size={policy['chunk_size']}; OpenTau overwrites "
                "the policy's value with the pipeline's, so a checkpoint that disagrees was edited by hand"
            )
        known = {f.name for f in fields(cls)}
        simple = {
            k: policy[k]
            for k in (
                "state_type",
                "prompt_max_length",
                "proj_width",
                "num_steps",
                "max_delay",
                "empty_cameras",
                "use_modality_embedding",
                "discrete_action_vocab_size",
                "tokenizer_path",
                "use_torch_compile",
            )
            if k in known and policy.get(k) is not None
        }
        version = policy.get("config_version")
        delta = policy.get("delta_action_state_map")
        names = policy.get("dataset_names")
        config = cls(
            num_cams=checkpoint.require("num_cams", int),
            resolution=(resolution[0], resolution[1]),
            max_state_dim=checkpoint.require("max_state_dim", int),
            max_action_dim=checkpoint.require("max_action_dim", int),
            chunk_size=chunk,
            input_features=_features(policy.get("input_features"), where, "input_features"),
            output_features=_features(policy.get("output_features"), where, "output_features"),
            normalization_mapping=dict(policy.get("normalization_mapping") or cls().normalization_mapping),
            config_version=int(version) if version is not None else 0,
            delta_action_state_map={int(a): int(s) for a, s in delta.items()} if delta else None,
            dataset_names=tuple(names) if names else None,
            dataset_to_norm_index=policy.get("dataset_to_norm_index"),
            arch=_architecture(policy, where),
            **simple,
        )
        config._validate(where)
        if os.environ.get("PI05_TORCH_COMPILE") in ("0", "1"):
            config = replace(config, use_torch_compile=os.environ["PI05_TORCH_COMPILE"] == "1")
        return config

    def _validate(self, where: str) -> None:
        if self.state_type not in ("discrete", "continuous"):
            raise CheckpointError(f"{where}: policy.state_type must be 'discrete' or 'continuous'")
        for kind, mode in self.normalization_mapping.items():
            if mode not in NORM_MODES:
                raise CheckpointError(f"{where}: normalization_mapping[{kind!r}]={mode!r}; known: {NORM_MODES}")
        if self.normalization_mapping.get("VISUAL", "IDENTITY") != "IDENTITY":
            raise CheckpointError(f"{where}: only IDENTITY normalisation of images is supported")
        self.state_key, self.action_key  # noqa: B018  (raise if missing)
        if self.state_dim > self.max_state_dim:
            raise CheckpointError(
                f"{where}: state feature has {self.state_dim} dims > max_state_dim {self.max_state_dim}"
            )
        if self.action_dim > self.max_action_dim:
            raise CheckpointError(
                f"{where}: action feature has {self.action_dim} dims > max_action_dim {self.max_action_dim}"
            )
        if not 0 <= self.max_delay <= self.chunk_size:
            raise CheckpointError(f"{where}: policy.max_delay={self.max_delay} must be in 0..{self.chunk_size}")
        if self.proj_width != self.arch.expert.hidden_size:
            raise CheckpointError(
                f"{where}: policy.proj_width={self.proj_width} must equal the action expert's hidden size "
                f"{self.arch.expert.hidden_size}"
            )
        if tuple(self.resolution) != (self.arch.vision.image_size,) * 2:
            raise CheckpointError(
                f"{where}: resolution {list(self.resolution)} differs from the vision tower's "
                f"{self.arch.vision.image_size}x{self.arch.vision.image_size}; not supported"
            )
        self.arch.check(where)

    def tokenizer_candidates(self, directory: Path) -> list[Path]:
        """Where tokenizer.model is looked for, in order."""
        candidates = []
        if self.tokenizer_path:
            named = Path(self.tokenizer_path).expanduser()
            named = named if named.is_absolute() else directory / named
            candidates.append(named / "tokenizer.model" if named.is_dir() or not named.suffix else named)
        candidates.append(directory / "tokenizer.model")
        if os.environ.get("PI05_TOKENIZER"):
            candidates.append(Path(os.environ["PI05_TOKENIZER"]).expanduser())
        return candidates


def _only(features: dict[str, Feature], kind: str) -> str:
    keys = [k for k, f in features.items() if f.type == kind]
    if len(keys) != 1:
        raise CheckpointError(f"pi05 needs exactly one {kind} feature, found {keys}")
    return keys[0]


def _features(raw: Any, where: str, name: str) -> dict[str, Feature]:
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{where}: policy.{name} is missing; OpenTau writes it into every pi05 checkpoint")
    out = {}
    for key, value in raw.items():
        try:
            out[key] = Feature(type=str(value["type"]), shape=tuple(int(s) for s in value["shape"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: policy.{name}[{key!r}] must be {{type, shape}}, got {value!r}") from None
    return out


def _architecture(policy: dict, where: str) -> Pi05Architecture:
    """Full-size pi05 unless the checkpoint names other sizes (tiny test checkpoints)."""
    pali = policy.get("paligemma_config") or {}
    expert = policy.get("gemma_expert_config") or {}
    try:
        vision = _sub(VisionConfig, pali.get("vision_config") or {})
        language = _sub(GemmaConfig, pali.get("text_config") or {})
        arch = Pi05Architecture(
            vision=vision,
            projection_dim=int(pali.get("projection_dim", language.hidden_size)),
            language=language,
            expert=_sub(GemmaConfig, expert, EXPERT_DEFAULT),
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: bad policy.paligemma_config / gemma_expert_config: {exc}") from None
    return arch


def _sub(cls, raw: dict, base=None):
    base = base if base is not None else cls()
    names = {f.name for f in fields(cls)}
    return replace(base, **{k: type(getattr(base, k))(v) for k, v in raw.items() if k in names})
