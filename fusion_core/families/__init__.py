"""Family descriptions and the lookup from a checkpoint's config to its family."""

from __future__ import annotations

import re

from ..errors import UnsupportedArchitectureError
from .base import Attention, Family, Layer, Merge, Node, Param, Tap, axis_spaces
from .bert import BERT
from .distilbert import DISTILBERT
from .gpt2 import GPT2
from .llama import LLAMA, MISTRAL, QWEN2
from .roberta import ROBERTA
from .vit import VIT

FAMILIES: tuple[Family, ...] = (BERT, VIT, ROBERTA, DISTILBERT, GPT2, LLAMA, MISTRAL, QWEN2)

__all__ = [
    "FAMILIES",
    "Attention",
    "Family",
    "Layer",
    "Merge",
    "Node",
    "Param",
    "Tap",
    "axis_spaces",
    "canonical_name",
    "resolve_family",
]


def resolve_family(config: dict, where: str = "") -> tuple[Family, str]:
    """Family and architecture class name of a checkpoint config."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise UnsupportedArchitectureError(
            f"{where}config.json architectures must be a list of names"
        )
    for family in FAMILIES:
        if model_type in family.model_types:
            arch = architectures[0] if architectures else next(iter(family.architectures))
            if arch not in family.architectures:
                supported = ", ".join(family.architectures)
                raise UnsupportedArchitectureError(
                    f"{where}architecture {arch!r} is not supported (supported: {supported})"
                )
            return family, arch
    known = ", ".join(a for f in FAMILIES for a in f.architectures)
    raise UnsupportedArchitectureError(
        f"{where}model_type {model_type!r} is not supported (supported architectures: {known})"
    )


def canonical_name(family: Family, key: str) -> str:
    """Map a serialized key to the description's name: strip the backbone prefix, undo
    renames of other library versions, and legacy LayerNorm gamma/beta."""
    if key.startswith(family.base_prefix):
        key = key[len(family.base_prefix) :]
    for pattern, replacement in family.renames:
        key = re.sub(pattern, replacement, key)
    if key.endswith(".gamma"):
        key = key[: -len(".gamma")] + ".weight"
    elif key.endswith(".beta"):
        key = key[: -len(".beta")] + ".bias"
    return key
