"""Read and write Hugging Face checkpoint folders by their serialized tensor names.

Only safetensors are read: a safetensors file is a JSON header plus raw bytes, so nothing
in it can execute. Legacy pickled checkpoints are refused unless the caller explicitly
allows torch's `weights_only` loader.
"""

from __future__ import annotations

import hashlib
import json
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import InputError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED_FILES = ("pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json")
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="otfuse-hash")


def _validate_safetensors(path: Path) -> set[str]:
    """Check a file's header and that every tensor's bytes are present; return its keys.

    safetensors maps lazily, so a truncated file would otherwise only fail mid-fusion.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise InputError(f"{path}: not a safetensors file (shorter than its header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise InputError(f"{path}: corrupt safetensors header (length {header_len})")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(
                f"{path}: corrupt safetensors header ({exc.__class__.__name__})"
            ) from exc
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header")
    data_size = size - 8 - header_len
    keys = set()
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            _, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: corrupt safetensors entry for {key!r}") from exc
        if end > data_size:
            raise InputError(f"{path}: truncated: tensor {key!r} ends past the end of the file")
        keys.add(key)
    return keys


@dataclass
class Checkpoint:
    """A checkpoint folder opened lazily: tensors are read one at a time, by serialized key."""

    path: Path
    config: dict
    key_files: dict[str, Path]
    allow_pickle: bool = False
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)
    _pickled: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _hashes: Future | None = field(default=None, repr=False)

    @property
    def keys(self) -> list[str]:
        return list(self.key_files)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[key].shape)
        return tuple(self._handle(self.key_files[key]).get_slice(key).get_shape())

    def tensor(self, key: str) -> torch.Tensor:
        if self._pickled is not None:
            tensor = self._pickled[key]
        else:
            try:
                tensor = self._handle(self.key_files[key]).get_tensor(key)
            except Exception as exc:  # safetensors raises its own error types
                raise InputError(
                    f"{self.key_files[key]}: cannot read tensor {key!r}: {exc}"
                ) from exc
        # A finite sum proves every value finite, at a fraction of an elementwise check.
        finite = not tensor.is_floating_point() or bool(
            torch.isfinite(tensor.sum(dtype=torch.float64))
        )
        if not finite and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{self.path}: tensor {key!r} contains NaN or inf values")
        return tensor

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return self._handles[file]

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every file read; hashed in the background from the moment the
        checkpoint is opened, so the fusion does not wait for it."""
        if self._hashes is None:
            self.start_hashing()
        return self._hashes.result()

    def start_hashing(self) -> None:
        if self._hashes is None:
            files = sorted({*self.key_files.values(), self.path / "config.json"})
            self._hashes = _HASHER.submit(lambda: {f.name: sha256_file(f) for f in files})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_checkpoint(path: str | Path, allow_pickle: bool = False) -> Checkpoint:
    """Open an HF folder: `config.json` plus `model.safetensors` or a sharded index."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(
            f"{folder}: not a checkpoint folder (does not exist or is not a directory)"
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise InputError(f"{folder}: missing config.json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{config_file}: invalid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise InputError(f"{config_file}: expected a JSON object")

    single, index = folder / SAFETENSORS_FILE, folder / SAFETENSORS_INDEX
    if single.is_file():
        return Checkpoint(folder, config, {key: single for key in _validate_safetensors(single)})
    if index.is_file():
        return Checkpoint(folder, config, _read_index(index))
    pickled = [folder / name for name in PICKLED_FILES if (folder / name).is_file()]
    if pickled and allow_pickle:
        return _open_pickled(folder, config, pickled[0])
    if pickled:
        raise InputError(
            f"{pickled[0]}: pickled checkpoints are not read (they can run code); convert it to "
            "safetensors, or allow torch's weights_only loader explicitly"
        )
    raise InputError(f"{folder}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")


def _read_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{index}: invalid shard index ({exc})") from exc
    key_files: dict[str, Path] = {}
    shard_keys: dict[Path, set[str]] = {}
    for key, shard_name in weight_map.items():
        shard = (index.parent / shard_name).resolve()
        if shard.parent != index.parent.resolve():
            raise InputError(f"{index}: shard {shard_name!r} lies outside the checkpoint folder")
        if not shard.is_file():
            raise InputError(f"{index}: shard {shard_name!r} is missing")
        if shard not in shard_keys:
            shard_keys[shard] = _validate_safetensors(shard)
        if key not in shard_keys[shard]:
            raise InputError(f"{shard}: tensor {key!r} listed in the index is missing")
        key_files[key] = shard
    return key_files


def _open_pickled(folder: Path, config: dict, file: Path) -> Checkpoint:
    if file.name.endswith(".json"):
        raise InputError(f"{file}: sharded pickled checkpoints are not supported")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{file}: weights_only load failed: {exc}") from exc
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    checkpoint = Checkpoint(folder, config, dict.fromkeys(state, file), allow_pickle=True)
    checkpoint._pickled = state
    return checkpoint
