"""The files a Hugging Face checkpoint folder is made of (no torch here: the service imports
this to decide what to download)."""

from __future__ import annotations

import re

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED_FILES = ("pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json")
# Besides weights: tokenizer and preprocessor files, carried over from the anchor.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "preprocessor_config.json",
    "image_processor_config.json",
    "generation_config.json",
)
_SHARD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors$")


def is_checkpoint_file(name: str, allow_pickle: bool = False) -> bool:
    """Whether a file of a checkpoint folder is needed to fuse it (others are never read)."""
    if name in (CONFIG_FILE, SAFETENSORS_INDEX, *SIDE_FILES) or _SHARD.match(name):
        return True
    return allow_pickle and name in PICKLED_FILES
