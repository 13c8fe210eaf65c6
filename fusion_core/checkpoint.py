"""Read and write Hugging Face checkpoint folders by their serialized tensor names.

Only safetensors are read: a safetensors file is a JSON header plus raw bytes, so nothing
in it can execute. Legacy pickled checkpoints are refused unless the caller explicitly
allows torch's `weights_only` loader.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import InputError
from .files import PICKLED_FILES, SAFETENSORS_FILE, SAFETENSORS_INDEX
from .headers import (
    DTYPE_BYTES,
    MAX_JSON_BYTES,
    MAX_NDIM,
    header_length,
    parse_header,
    parse_json,
    shard_name_ok,
)

_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="otfuse-hash")
__all__ = ["DTYPE_BYTES", "MAX_JSON_BYTES", "MAX_NDIM", "Checkpoint", "open_checkpoint"]


def _validate_safetensors(path: Path) -> dict[str, tuple[int, ...]]:
    """Check a file's header against the format and the file's size (`headers.parse_header`);
    return key -> shape. safetensors maps lazily, so a truncated file would otherwise only
    fail mid-fusion."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            length = header_length(str(path), handle.read(8), size)
            raw = handle.read(length)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    entries = parse_header(str(path), raw, size - 8 - length)
    return {key: entry.shape for key, entry in entries.items()}


@dataclass
class Checkpoint:
    """A checkpoint folder opened lazily: tensors are read one at a time, by serialized key."""

    path: Path
    config: dict
    key_files: dict[str, Path]
    shapes: dict[str, tuple[int, ...]]  # from the headers: known without reading any data
    allow_pickle: bool = False
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)
    _pickled: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _hashes: Future | None = field(default=None, repr=False)

    @property
    def keys(self) -> list[str]:
        return list(self.key_files)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

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
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise InputError(f"{file}: not a readable safetensors file: {exc}") from exc
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
    config = read_json_file(config_file, "config")
    single, index = folder / SAFETENSORS_FILE, folder / SAFETENSORS_INDEX
    if single.is_file():
        shapes = _validate_safetensors(single)
        return Checkpoint(folder, config, dict.fromkeys(shapes, single), shapes)
    if index.is_file():
        return Checkpoint(folder, config, *_read_index(index))
    pickled = [folder / name for name in PICKLED_FILES if (folder / name).is_file()]
    if pickled and allow_pickle:
        return _open_pickled(folder, config, pickled[0])
    if pickled:
        raise InputError(
            f"{pickled[0]}: pickled checkpoints are not read (they can run code); convert it to "
            "safetensors, or allow torch's weights_only loader explicitly"
        )
    raise InputError(f"{folder}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")


def read_json_file(path: Path, what: str) -> dict:
    """A small JSON object file (config, shard index), size-capped before it is parsed."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise InputError(f"{path}: {what} is larger than {MAX_JSON_BYTES >> 20} MiB")
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return parse_json(str(path), raw)


def _read_index(index: Path) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
    weight_map = read_json_file(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: invalid shard index (no weight_map object)")
    key_files: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    shard_shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shard_name in weight_map.items():
        if not shard_name_ok(shard_name):
            raise InputError(
                f"{index}: shard {shard_name!r} is not a file in the checkpoint folder"
            )
        shard = index.parent / shard_name
        if shard_name not in shard_shapes:
            if not shard.is_file():
                raise InputError(f"{index}: shard {shard_name!r} is missing")
            shard_shapes[shard_name] = _validate_safetensors(shard)
        if key not in shard_shapes[shard_name]:
            raise InputError(f"{shard}: tensor {key!r} listed in the index is missing")
        key_files[key] = shard
        shapes[key] = shard_shapes[shard_name][key]
    return key_files, shapes


def _open_pickled(folder: Path, config: dict, file: Path) -> Checkpoint:
    if file.name.endswith(".json"):
        raise InputError(f"{file}: sharded pickled checkpoints are not supported")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{file}: weights_only load failed: {exc}") from exc
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    checkpoint = Checkpoint(folder, config, dict.fromkeys(state, file), shapes, allow_pickle=True)
    checkpoint._pickled = state
    return checkpoint
