"""Which checkpoints an app serves, under which names, and which one a robot gets when it names none.

    args.checkpoint        one directory: the default model (OpenTau-era configs keep working)
    args.checkpoints       {name: directory}: more models, picked by gRPC metadata `multiplexed_model_id`
    args.default_model     the name robots that send no id get

Naming rules, so that every config means one thing:
- `checkpoint` alone: one model, named `default_model` (or "default").
- `checkpoints` alone: `default_model` names one of them; with a single entry it may be left out.
- both: `checkpoint` is the default, named `default_model` (or "default"); if `checkpoints` has that
  name too, it must be the same directory.

Plain Python, no Ray: build_app resolves and verifies it at deploy time, the replica reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import grpc

from serve_app.errors import RequestError

DEFAULT_NAME = "default"
# Names travel in gRPC metadata and Prometheus labels: keep them to characters both carry verbatim.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")


@dataclass(frozen=True)
class ModelTable:
    checkpoints: Mapping[str, str]  # name -> checkpoint directory (resolved)
    default: str

    @property
    def names(self) -> list[str]:
        return sorted(self.checkpoints)

    def resolve(self, requested: str | None) -> str:
        """The model a call asked for ('' or None: the default); NOT_FOUND naming the ones that exist."""
        if not requested:
            return self.default
        if requested in self.checkpoints:
            return requested
        raise RequestError(
            grpc.StatusCode.NOT_FOUND,
            f"unknown model {requested!r} (metadata multiplexed_model_id); this app serves "
            f"{', '.join(self.names)} (default {self.default!r}, for calls that name none)",
        )

    def directory(self, name: str) -> str:
        return self.checkpoints[name]


def model_table(
    checkpoint: str | None,
    checkpoints: Mapping[str, str] | None,
    default_model: str | None,
    resolve: Callable[[str], str] = str,
) -> ModelTable:
    """The table from the app's args; ValueError says which arg is wrong. `resolve` makes paths absolute."""
    table: dict[str, str] = {}
    if checkpoints is not None and not isinstance(checkpoints, Mapping):
        raise ValueError(f"serve_app: args.checkpoints must map a model name to a checkpoint directory, "
                         f"got {type(checkpoints).__name__}")
    for name, path in (checkpoints or {}).items():
        _check_name(name, "args.checkpoints")
        if not isinstance(path, str) or not path:
            raise ValueError(f"serve_app: args.checkpoints.{name} must be a checkpoint directory, got {path!r}")
        table[name] = resolve(path)
    if default_model is not None:
        _check_name(default_model, "args.default_model")
    if checkpoint:
        name = default_model or DEFAULT_NAME
        path = resolve(checkpoint)
        if name in table and table[name] != path:
            raise ValueError(f"serve_app: args.checkpoint ({path}) is the default model {name!r}, but "
                             f"args.checkpoints.{name} is {table[name]}; name the default once")
        table[name] = path
        return ModelTable(table, name)
    if not table:
        raise ValueError("serve_app: args.checkpoint or args.checkpoints is required "
                         "(a checkpoint directory, or a map of model names to them)")
    if default_model is None:
        if len(table) > 1:
            raise ValueError(f"serve_app: args.default_model is required with several checkpoints "
                             f"({', '.join(sorted(table))}): robots that send no multiplexed_model_id get it")
        default_model = next(iter(table))
    if default_model not in table:
        raise ValueError(f"serve_app: args.default_model {default_model!r} is not in args.checkpoints "
                         f"({', '.join(sorted(table))})")
    return ModelTable(table, default_model)


def _check_name(name, where: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"serve_app: {where}: model name {name!r} must be 1-128 characters of letters, digits "
                         "and . _ : @ / - (it travels in gRPC metadata and metric labels), starting with a "
                         "letter or digit")
