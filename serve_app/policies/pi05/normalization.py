"""OpenTau's normalisation buffers and their arithmetic, for state in and actions out.

A checkpoint carries four modules of stacked statistics, one row per
normalisation head (dataset or robot/control mode), each buffer (D, dim):

    normalize_inputs.buffer_<state>.{mean,std | min,max | q01,q99}
    normalize_targets.buffer_<actions>.*          (used for the RTC prefix)
    normalize_discrete_actions.buffer_<actions>.{min,max}   (training only)
    unnormalize_outputs.buffer_<actions>.*

Arithmetic follows OpenTau 0.14.0 exactly, including the near-zero std/range
snap to 1 and the config_version switch of eps and zero-range centring.
"""

from __future__ import annotations

import torch
from torch import nn

from serve_app.checkpoint import CheckpointError
from serve_app.policies.pi05.configuration import Feature, Pi05Config

STAT_NAMES = {"MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max"), "QUANTILE": ("q01", "q99")}


class FeatureStats(nn.Module):
    """Stacked statistics of one feature: buffers named like OpenTau's nn.ParameterDict entries."""

    def __init__(self, mode: str, rows: int, dim: int):
        super().__init__()
        self.mode = mode
        self.lo_name, self.hi_name = STAT_NAMES[mode]
        for name in STAT_NAMES[mode]:
            self.register_buffer(name, torch.full((rows, dim), torch.inf))

    def lo_hi(self, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, self.lo_name)[head], getattr(self, self.hi_name)[head]


class StatsModule(nn.Module):
    """One of normalize_inputs / normalize_targets / normalize_discrete_actions / unnormalize_outputs."""

    def __init__(self, features: dict[str, Feature], mapping: dict[str, str], rows: int):
        super().__init__()
        for key, feature in features.items():
            mode = mapping.get(feature.type, "IDENTITY")
            if mode == "IDENTITY":
                continue
            if len(feature.shape) != 1:
                raise CheckpointError(f"normalisation of non-vector feature {key!r} {feature.shape} is not supported")
            self.add_module("buffer_" + key.replace(".", "_"), FeatureStats(mode, rows, feature.shape[0]))

    def stats(self, key: str) -> FeatureStats | None:
        return getattr(self, "buffer_" + key.replace(".", "_"), None)


def stats_modules(c: Pi05Config, rows: int) -> dict[str, StatsModule]:
    """The four statistics modules of a checkpoint, by their state-dict names."""
    return {
        "normalize_inputs": StatsModule(c.input_features, c.normalization_mapping, rows),
        "normalize_targets": StatsModule(c.output_features, c.normalization_mapping, rows),
        "normalize_discrete_actions": StatsModule(c.output_features, {"ACTION": "MIN_MAX"}, rows),
        "unnormalize_outputs": StatsModule(c.output_features, c.normalization_mapping, rows),
    }


class Normalizer:
    """State in, RTC prefix in, actions out, with one statistics row (`head`)."""

    def __init__(self, c: Pi05Config, modules: dict[str, StatsModule], head: int):
        self.eps = c.norm_eps
        self.center = c.zero_range_center
        self.head = head
        self._state = modules["normalize_inputs"].stats(c.state_key)
        self._prefix = modules["normalize_targets"].stats(c.action_key)
        self._out = modules["unnormalize_outputs"].stats(c.action_key)

    def normalize_state(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self._state, x)

    def normalize_actions(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self._prefix, x)

    def unnormalize_actions(self, x: torch.Tensor) -> torch.Tensor:
        s = self._out
        if s is None:
            return x
        lo, hi = s.lo_hi(self.head)
        if s.mode == "MEAN_STD":
            std = torch.where(hi.abs() < self.eps, torch.ones_like(hi), hi)
            return x * (std + self.eps) + lo
        rng = hi - lo
        denom = torch.where(rng.abs() < self.eps, torch.ones_like(rng), rng)
        y = (x + 1) / 2 * (denom + self.eps) + lo
        return y - 0.5 * (denom - rng) if self.center else y

    def _forward(self, s: FeatureStats | None, x: torch.Tensor) -> torch.Tensor:
        if s is None:
            return x
        lo, hi = s.lo_hi(self.head)
        if s.mode == "MEAN_STD":
            std = torch.where(hi.abs() < self.eps, torch.ones_like(hi), hi)
            return (x - lo) / (std + self.eps)
        rng = hi - lo
        denom = torch.where(rng.abs() < self.eps, torch.ones_like(rng), rng)
        shifted = x - lo
        if self.center:
            shifted = shifted + 0.5 * (denom - rng)
        return shifted / (denom + self.eps) * 2 - 1


def norm_head(c: Pi05Config, rows: int, server: dict, where: str) -> int:
    """Which statistics row to serve with, chosen once at start-up as OpenTau's server does."""
    if rows <= 1:
        return 0
    names = list(c.dataset_names or [])
    robot, mode, repo = server.get("robot_type"), server.get("control_mode"), server.get("dataset_repo_id")
    if robot is not None and mode is not None and names:
        key = f"{robot}::{mode}"
        if key in names:
            return names.index(key)
        raise CheckpointError(f"{where}: server robot_type/control_mode {key!r} is not a norm head; heads: {names}")
    if repo is not None:
        index = dict(c.dataset_to_norm_index or {n: i for i, n in enumerate(names)})
        if repo in index:
            return int(index[repo])
        raise CheckpointError(f"{where}: server.dataset_repo_id {repo!r} is not a training dataset: {sorted(index)}")
    raise CheckpointError(
        f"{where}: the checkpoint has {rows} normalisation heads; set server.robot_type + server.control_mode "
        "or server.dataset_repo_id in train_config.json to pick one"
    )
