"""A parent model as the engine sees it: a lazy checkpoint under canonical tensor names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint, open_checkpoint
from .errors import IncompatibleModelsError, InputError
from .families import Family, Layer, Node, canonical_name, resolve_family


@dataclass
class ParentModel:
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

    def config_value(self, role: str) -> int:
        key = self.family.config_keys[role]
        try:
            return int(self.checkpoint.config[key])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{self.label}: config.json lacks a valid {key!r}") from exc

    def has(self, name: str) -> bool:
        return name in self.keys

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.keys:
            raise InputError(f"{self.label}: missing tensor {name!r}")
        return self.checkpoint.tensor(self.keys[name])


def open_parent(index: int, path: str | Path, allow_pickle: bool = False) -> ParentModel:
    checkpoint = open_checkpoint(path, allow_pickle=allow_pickle)
    checkpoint.start_hashing()  # recorded in fusion.json; overlaps with the fusion
    family, architecture = resolve_family(checkpoint.config, where=f"model {index} ({path}): ")
    keys: dict[str, str] = {}
    for key in checkpoint.keys:
        name = canonical_name(family, key)
        if name in keys:
            raise InputError(f"model {index} ({path}): tensors {keys[name]!r} and {key!r} collide")
        keys[name] = key
    return ParentModel(index, checkpoint, family, architecture, keys)


def check_compatible(parents: list[ParentModel], nodes: list[Node]) -> None:
    """Everything that must agree before fusing: family, architecture, depth, heads, every
    tensor present, and the sizes of axes no TM acts on."""
    anchor = parents[0]
    for other in parents[1:]:
        if other.family is not anchor.family:
            raise IncompatibleModelsError(
                f"{other.label} is a {other.family.name} model, "
                f"{anchor.label} a {anchor.family.name} model"
            )
        if other.architecture != anchor.architecture:
            raise IncompatibleModelsError(
                f"{other.label} is a {other.architecture}, {anchor.label} a {anchor.architecture}"
            )
        for role, what in (("layers", "layers"), ("heads", "attention heads")):
            if other.config_value(role) != anchor.config_value(role):
                raise IncompatibleModelsError(
                    f"{other.label} has {other.config_value(role)} {what}, "
                    f"{anchor.label} has {anchor.config_value(role)}"
                )
    covered = set(anchor.family.buffers)
    for node in nodes:
        if not isinstance(node, Layer):
            continue
        for param in node.params:
            covered.add(param.name)
            present = [p.has(param.name) for p in parents]
            if param.optional and not present[0]:
                continue
            for parent, has in zip(parents, present, strict=True):
                if not has and not (param.optional and param.tied_to):
                    raise InputError(f"{parent.label}: missing tensor {param.name!r}")
            for parent in parents[1:]:
                if not parent.has(param.name):
                    continue
                a_shape = anchor.checkpoint.shape(anchor.keys[param.name])
                o_shape = parent.checkpoint.shape(parent.keys[param.name])
                if len(a_shape) != len(param.axes) or len(o_shape) != len(a_shape):
                    raise InputError(
                        f"{parent.label}: tensor {param.name!r} has shape {o_shape}, "
                        f"expected {len(param.axes)} dimensions"
                    )
                for axis, (a_size, o_size) in enumerate(zip(a_shape, o_shape, strict=True)):
                    if param.axes[axis] is None and a_size != o_size:
                        raise IncompatibleModelsError(
                            f"{parent.label}: tensor {param.name!r} has size {o_size} on axis "
                            f"{axis}, {anchor.label} has {a_size}; only widths may differ"
                        )
    for parent in parents:
        unknown = sorted(set(parent.keys) - covered)
        if unknown:
            raise InputError(
                f"{parent.label}: tensor {unknown[0]!r} is not part of the "
                f"{parent.family.name} description ({len(unknown)} unknown in all)"
            )
