"""Read and write Hugging Face checkpoint folders by their serialized tensor names.

Only safetensors are read: a safetensors file is a JSON header plus raw bytes, so nothing
in it can execute. Legacy pickled checkpoints are refused unless the caller explicitly
allows torch's `weights_only` loader.

Tensors are read with positioned reads at the offsets of the checked header, whole or a
range of rows at a time, into memory the caller owns: nothing is memory-mapped, so a
process holds only what it reads (a mapped file would count its touched pages in the
process's resident memory until it is unmapped).
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

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
TORCH_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
}
SAFETENSORS_DTYPES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """Where a tensor's bytes are in its file (absolute offsets), as the header says."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _validate_safetensors(path: Path) -> dict[str, Entry]:
    """Check a file's header against the format and the file's size (`headers.parse_header`);
    return key -> where each tensor's bytes are."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            length = header_length(str(path), handle.read(8), size)
            raw = handle.read(length)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return {
        key: Entry(path, TORCH_DTYPES[e.dtype], e.shape, *(8 + length + o for o in e.offsets))
        for key, e in parse_header(str(path), raw, size - 8 - length).items()
    }


@dataclass
class Checkpoint:
    """A checkpoint folder opened lazily: tensors are read one at a time, by serialized key."""

    path: Path
    config: dict
    entries: dict[str, Entry]  # from the headers: known without reading any data
    allow_pickle: bool = False
    _files: dict[Path, int] = field(default_factory=dict, repr=False)
    _pickled: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _hashes: Future | None = field(default=None, repr=False)

    @property
    def keys(self) -> list[str]:
        return list(self.entries)

    @property
    def key_files(self) -> dict[str, Path]:
        return {key: entry.file for key, entry in self.entries.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: entry.shape for key, entry in self.entries.items()}

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key].dtype

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    def tensor(self, key: str) -> torch.Tensor:
        return self.rows(key, 0, None)

    def rows(self, key: str, start: int, stop: int | None, check: bool = True) -> torch.Tensor:
        """Rows start:stop of a tensor (its first axis; all of a 0-d tensor), read alone;
        without `check` the caller checks the values are finite (`check_finite`)."""
        entry = self.entries[key]
        if self._pickled is not None:
            tensor = self._pickled[key]
            tensor = tensor[start:stop] if tensor.dim() else tensor
        else:
            shape = list(entry.shape)
            row_bytes = (entry.end - entry.start) // shape[0] if shape and shape[0] else 0
            if shape:
                stop = shape[0] if stop is None else min(stop, shape[0])
                start = min(start, stop)
                shape[0] = max(stop - start, 0)
            tensor = torch.empty(shape, dtype=entry.dtype)
            self._read_into(entry, entry.start + start * row_bytes, tensor)
        if check:
            self.check_finite(key, tensor)
        return tensor

    def check_finite(self, key: str, tensor: torch.Tensor) -> None:
        """A finite sum proves every value finite, at a fraction of an elementwise check (a
        sum that overflows is checked element by element)."""
        finite = not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum()))
        if not finite and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{self.path}: tensor {key!r} contains NaN or inf values")

    def _read_into(self, entry: Entry, offset: int, tensor: torch.Tensor) -> None:
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        try:
            if entry.file not in self._files:
                self._files[entry.file] = os.open(entry.file, os.O_RDONLY)
            fd = self._files[entry.file]
            done = 0
            while done < len(buffer):
                got = os.preadv(fd, [buffer[done:]], offset + done)
                if got <= 0:
                    raise InputError(f"{entry.file}: truncated while reading")
                done += got
        except OSError as exc:
            raise InputError(f"{entry.file}: cannot read ({exc.strerror or exc})") from exc

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __del__(self) -> None:
        self.close()

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every file read; hashed in the background from the moment the
        checkpoint is opened, so the fusion does not wait for it."""
        if self._hashes is None:
            self.start_hashing()
        return self._hashes.result()

    def start_hashing(self) -> None:
        if self._hashes is None:
            files = sorted({*(e.file for e in self.entries.values()), self.path / "config.json"})
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
        return Checkpoint(folder, config, _validate_safetensors(single))
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


def read_json_file(path: Path, what: str) -> dict:
    """A small JSON object file (config, shard index), size-capped before it is parsed."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise InputError(f"{path}: {what} is larger than {MAX_JSON_BYTES >> 20} MiB")
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return parse_json(str(path), raw)


def _read_index(index: Path) -> dict[str, Entry]:
    weight_map = read_json_file(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: invalid shard index (no weight_map object)")
    entries: dict[str, Entry] = {}
    shard_shapes: dict[str, dict[str, Entry]] = {}
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
        entries[key] = shard_shapes[shard_name][key]
    return entries


def _open_pickled(folder: Path, config: dict, file: Path) -> Checkpoint:
    if file.name.endswith(".json"):
        raise InputError(f"{file}: sharded pickled checkpoints are not supported")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{file}: weights_only load failed: {exc}") from exc
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    entries = {k: Entry(file, v.dtype, tuple(v.shape), 0, 0) for k, v in state.items()}
    checkpoint = Checkpoint(folder, config, entries, allow_pickle=True)
    checkpoint._pickled = state
    return checkpoint
