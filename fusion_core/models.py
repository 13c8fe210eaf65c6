"""A parent model as the engine sees it: a lazy checkpoint under canonical tensor names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint, open_checkpoint
from .errors import IncompatibleModelsError, InputError
from .families import Attention, Family, Layer, Node, Param, canonical_name, resolve_family


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

    @property
    def kv_heads(self) -> int:
        """Key/value heads: fewer than the query heads under grouped-query attention (a
        config without the key, or with null, has as many as query heads)."""
        key = self.family.config_keys.get("kv_heads")
        if key is not None and self.checkpoint.config.get(key) is not None:
            return self.config_value("kv_heads")
        return self.config_value("heads")

    @property
    def ties_embeddings(self) -> bool:
        return bool(self.checkpoint.config.get("tie_word_embeddings", self.family.tie_default))

    def is_tied(self, param: Param) -> bool:
        """A tied copy (LM head) written as its fused source rather than fused itself."""
        return param.tied_to is not None and self.ties_embeddings

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
        for what, count in (
            ("layers", lambda p: p.config_value("layers")),
            ("attention heads", lambda p: p.config_value("heads")),
            ("key/value heads", lambda p: p.kv_heads),
        ):
            if count(other) != count(anchor):
                raise IncompatibleModelsError(
                    f"{other.label} has {count(other)} {what}, {anchor.label} has {count(anchor)}"
                )
    if anchor.kv_heads < 1 or anchor.config_value("heads") % anchor.kv_heads:
        raise InputError(
            f"{anchor.label}: {anchor.config_value('heads')} attention heads do not split into "
            f"{anchor.kv_heads} key/value groups"
        )
    covered = set(anchor.family.buffer_names(anchor.config_value("layers")))
    layers = [node for node in nodes if isinstance(node, Layer)]
    for param in (p for layer in layers for p in layer.params):
        covered.add(param.name)
        _check_param(parents, param)
    for node in nodes:
        if isinstance(node, Attention) and node.rotary:
            _check_rotary_heads(parents, node, layers)
    for parent in parents:
        unknown = sorted(set(parent.keys) - covered)
        if unknown:
            raise InputError(
                f"{parent.label}: tensor {unknown[0]!r} is not part of the "
                f"{parent.family.name} description ({len(unknown)} unknown in all)"
            )


def _check_param(parents: list[ParentModel], param: Param) -> None:
    """Present where it is fused (a tied copy need not be), and of one size on every axis no
    TM acts on."""
    anchor = parents[0]
    if anchor.is_tied(param) or (param.optional and not anchor.has(param.name)):
        return
    for parent in parents:
        if not parent.has(param.name):
            raise InputError(f"{parent.label}: missing tensor {param.name!r}")
    a_shape = anchor.checkpoint.shape(anchor.keys[param.name])
    for parent in parents[1:]:
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


def _check_rotary_heads(
    parents: list[ParentModel], attention: Attention, layers: list[Layer]
) -> None:
    """Rotary heads are never split or resized: every model needs the anchor's head_dim."""
    query = next(p for n in layers for p in n.params if p.axes[0] == ("out", attention.query))
    anchor = parents[0]
    heads = anchor.config_value("heads")
    width = anchor.checkpoint.shape(anchor.keys[query.name])[0]
    for parent in parents[1:]:
        other = parent.checkpoint.shape(parent.keys[query.name])[0]
        if other != width:
            raise IncompatibleModelsError(
                f"{parent.label} has head_dim {other // heads}, {anchor.label} has "
                f"{width // heads}; rotary attention heads cannot be resized"
            )
