"""What sizes a family's tensors, read from config.json under the family's own key names.

`config_sizes` reads the size roles a config states: the family's `config_keys` (heads,
key/value heads) and `size_keys` ("hidden", "mlp", "head_dim", "vocab", "positions",
"token_types", "channels", ...), a classifier's "labels" as every transformers config sizes
it, and what a family derives from them (`derive_sizes`). A role the config leaves out is
missing rather than guessed from a library default; the check then asks transformers itself
(limits.py). Values that no model could have raise InputError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    from .base import Family

Config = Mapping[str, Any]


def config_sizes(family: Family, config: Config) -> dict[str, int]:
    keys = {role: key for role, key in family.config_keys.items() if role != "layers"}
    sizes = _roles(config, keys | family.size_keys) | _labels(config)
    if family.derive_sizes is not None:
        sizes |= family.derive_sizes(config, sizes)
    return sizes


def _positive(config: Config, key: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if type(value) is not int or value <= 0:
        raise InputError(f"config.json {key}={value!r} must be a positive integer")
    return value


def _roles(config: Config, keys: Mapping[str, str]) -> dict[str, int]:
    found = {role: _positive(config, key) for role, key in keys.items()}
    return {role: value for role, value in found.items() if value is not None}


def _labels(config: Config) -> dict[str, int]:
    """transformers sizes a classifier by `id2label` when the config has one, else by
    `num_labels`, else 2 (every config class's default, which save_pretrained then leaves
    out of config.json)."""
    id2label = config.get("id2label")
    if isinstance(id2label, Mapping) and id2label:
        return {"labels": len(id2label)}
    return _roles(config, {"labels": "num_labels"}) or {"labels": 2}


def gpt2_mlp(config: Config, sizes: dict[str, int]) -> dict[str, int]:
    """GPT-2's documented meaning of a null `n_inner`: four times the hidden size."""
    if config.get("n_inner") is None and "hidden" in sizes:
        return {"mlp": 4 * sizes["hidden"]}
    return {}


def vit_positions(config: Config, sizes: dict[str, int]) -> dict[str, int]:
    """Square images and patches: the patches and the class token (a pair of sizes is left
    to transformers)."""
    image, patch = config.get("image_size"), config.get("patch_size")
    if type(image) is int and type(patch) is int and image > 0 and patch > 0:
        return {"patch_size": patch, "positions": (image // patch) ** 2 + 1}
    return {}
