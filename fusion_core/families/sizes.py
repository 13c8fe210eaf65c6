"""What sizes a family's tensors, read from config.json under the family's own key names.

Each function returns the size roles a config states (see `Family.sizes`): "hidden" (the
residual stream), "mlp", "heads", "kv_heads", "head_dim", "vocab", "positions",
"token_types", "labels" and, for vision, "channels" and "patch_size". A role the config
leaves out is missing rather than guessed from a library default; the check then asks
transformers itself (limits.py). Values that no model could have raise InputError.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import InputError

Config = Mapping[str, Any]


def _positive(config: Config, key: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if type(value) is not int or value <= 0:
        raise InputError(f"config.json {key}={value!r} must be a positive integer")
    return value


def _roles(config: Config, keys: dict[str, str]) -> dict[str, int]:
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


def _classifier_sizes(keys: dict[str, str]) -> Callable[[Config], dict[str, int]]:
    """Sizes of an encoder family under its key names, plus its classifier's labels."""
    return lambda config: _roles(config, keys) | _labels(config)


bert_sizes = _classifier_sizes(  # also RoBERTa, XLM-R
    {
        "hidden": "hidden_size",
        "mlp": "intermediate_size",
        "heads": "num_attention_heads",
        "vocab": "vocab_size",
        "positions": "max_position_embeddings",
        "token_types": "type_vocab_size",
    }
)
distilbert_sizes = _classifier_sizes(
    {
        "hidden": "dim",
        "mlp": "hidden_dim",
        "heads": "n_heads",
        "vocab": "vocab_size",
        "positions": "max_position_embeddings",
    }
)


def gpt2_sizes(config: Config) -> dict[str, int]:
    keys = {
        "hidden": "n_embd",
        "heads": "n_head",
        "vocab": "vocab_size",
        "positions": "n_positions",
    }
    sizes = _roles(config, keys) | _roles(config, {"mlp": "n_inner"})
    if config.get("n_inner") is None and "hidden" in sizes:
        sizes["mlp"] = 4 * sizes["hidden"]  # GPT-2's documented meaning of a null n_inner
    return sizes


def llama_sizes(config: Config) -> dict[str, int]:  # also Mistral, Qwen2
    keys = {
        "hidden": "hidden_size",
        "mlp": "intermediate_size",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",  # null or absent: as many as the query heads
        "head_dim": "head_dim",  # null or absent: hidden / heads
        "vocab": "vocab_size",
    }
    return _roles(config, keys)


def vit_sizes(config: Config) -> dict[str, int]:
    keys = {
        "hidden": "hidden_size",
        "mlp": "intermediate_size",
        "heads": "num_attention_heads",
        "channels": "num_channels",
    }
    sizes = _roles(config, keys) | _labels(config)
    image, patch = config.get("image_size"), config.get("patch_size")
    if type(image) is int and type(patch) is int and image > 0 and patch > 0:
        # square images and patches (a pair of sizes is left to transformers)
        sizes["patch_size"] = patch
        sizes["positions"] = (image // patch) ** 2 + 1  # the patches and the class token
    return sizes
