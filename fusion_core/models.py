"""A parent model as the engine sees it: a lazy checkpoint under canonical tensor names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint, open_checkpoint
from .compat import ModelRoles, canonical_keys, check_compatible
from .errors import InputError
from .families import Family, resolve_family

__all__ = ["ParentModel", "check_compatible", "open_parent"]


@dataclass
class ParentModel(ModelRoles):
    index: int
    checkpoint: Checkpoint
    family: Family
    architecture: str
    keys: dict[str, str]  # canonical name -> serialized key

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def label(self) -> str:
        return f"model {self.index} ({self.path})"

    @property
    def config(self) -> dict:
        return self.checkpoint.config

    def shape(self, name: str) -> tuple[int, ...]:
        return self.checkpoint.shape(self.keys[name])

    @property
    def parameter_count(self) -> int:
        return self.checkpoint.parameter_count

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.keys:
            raise InputError(f"{self.label}: missing tensor {name!r}")
        return self.checkpoint.tensor(self.keys[name])


def open_parent(index: int, path: str | Path, allow_pickle: bool = False) -> ParentModel:
    checkpoint = open_checkpoint(path, allow_pickle=allow_pickle)
    checkpoint.start_hashing()  # recorded in fusion.json; overlaps with the fusion
    family, architecture = resolve_family(checkpoint.config, where=f"model {index} ({path}): ")
    keys = canonical_keys(family, checkpoint.keys, f"model {index} ({path})")
    return ParentModel(index, checkpoint, family, architecture, keys)
