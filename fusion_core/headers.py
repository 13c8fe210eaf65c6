"""A checkpoint folder from its config.json and safetensors headers alone (no torch here: the
API process plans and checks jobs with it, and reads S3 inputs through ranged GETs).

A safetensors file is 8 bytes of header length, a JSON header, then raw bytes. The header is
checked strictly against the format and the file's size: every entry names a known dtype, a
shape of non-negative ints and offsets inside the file whose length matches the shape, so
nothing later reads past the data or allocates what the header does not back with bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import InputError
from .files import (
    CONFIG_FILE,
    PICKLED_FILES,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    is_checkpoint_file,
)

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_JSON_BYTES = 16 * 1024 * 1024  # config.json and shard indexes are kilobytes
MAX_NDIM = 8

# Element sizes of the dtypes safetensors files carry; anything else is refused.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class Entry:
    dtype: str  # safetensors' name: "BF16", "F32", ...
    shape: tuple[int, ...]
    offsets: tuple[int, int] = (0, 0)  # [start, end) in the data after the header

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


def header_length(where: str, first: bytes, size: int) -> int:
    """The header length the first 8 bytes of a file of `size` bytes declare, bounded."""
    if len(first) < 8:
        raise InputError(f"{where}: not a safetensors file (shorter than its header)")
    (length,) = struct.unpack("<Q", first[:8])
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise InputError(f"{where}: corrupt safetensors header (length {length})")
    return length


def parse_header(where: str, raw: bytes, data_size: int) -> dict[str, Entry]:
    """Key -> entry of a header (the bytes after the length), checked against the size of
    the data that follows it."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{where}: corrupt safetensors header ({exc.__class__.__name__})") from exc
    if not isinstance(header, dict):
        raise InputError(f"{where}: corrupt safetensors header")
    return {
        key: _entry(where, key, info, data_size)
        for key, info in header.items()
        if key != "__metadata__"
    }


def _entry(where: str, key: str, info, data_size: int) -> Entry:
    def corrupt(why: str) -> InputError:
        return InputError(f"{where}: corrupt safetensors entry {key!r}: {why}")

    if not isinstance(info, dict):
        raise corrupt("not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise corrupt(f"unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise corrupt(f"shape {shape!r} is not a list of at most {MAX_NDIM} sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise corrupt(f"data_offsets {offsets!r} are not [start, end]")
    if offsets[1] > data_size:
        raise InputError(f"{where}: truncated: tensor {key!r} ends past the end of the file")
    if math.prod(shape) * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
        raise corrupt(f"shape {shape} of {dtype} does not fill offsets {offsets}")
    return Entry(dtype, tuple(shape), (offsets[0], offsets[1]))


def parse_json(where: str, raw: bytes) -> dict:
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"{where}: invalid JSON ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected a JSON object")
    return value


def shard_name_ok(name) -> bool:
    """A bare file name beside the index: no separators, no parent references."""
    if not isinstance(name, str) or name in ("", ".", ".."):
        return False
    return not any(c in name for c in "/\\\0")


class Folder(Protocol):
    """Where a checkpoint's bytes come from: a local folder, or an S3 prefix (ranged GETs)."""

    where: str  # how errors name it (a path or a URI)

    def sizes(self) -> dict[str, int]:
        """File name -> size, for the files of the folder a fusion reads."""
        ...

    def read(self, name: str, start: int, length: int) -> bytes: ...


@dataclass
class LocalFolder:
    path: Path

    @property
    def where(self) -> str:
        return str(self.path)

    def sizes(self) -> dict[str, int]:
        if not self.path.is_dir():
            raise InputError(
                f"{self.path}: not a checkpoint folder (does not exist or is not a directory)"
            )
        return {
            p.name: p.stat().st_size
            for p in sorted(self.path.iterdir())
            if p.is_file() and is_checkpoint_file(p.name, allow_pickle=True)
        }

    def read(self, name: str, start: int, length: int) -> bytes:
        try:
            with (self.path / name).open("rb") as handle:
                handle.seek(start)
                return handle.read(length)
        except OSError as exc:
            raise InputError(f"{self.path / name}: cannot read ({exc.strerror or exc})") from exc


@dataclass
class Headers:
    """What a checkpoint is, without its tensors: config, and every tensor's dtype and shape
    by serialized key."""

    where: str
    config: dict
    entries: dict[str, Entry]
    file_bytes: int  # bytes of the weight files (what a fusion reads)


def read_headers(folder: Folder) -> Headers:
    """Config and tensor headers of a checkpoint folder (safetensors only: pickled
    checkpoints have no header to read)."""
    where = folder.where
    sizes = folder.sizes()
    if CONFIG_FILE not in sizes:
        raise InputError(f"{where}: missing {CONFIG_FILE}")
    config = _read_json(folder, CONFIG_FILE, sizes[CONFIG_FILE], "config")
    if SAFETENSORS_FILE in sizes:
        entries = read_file_header(folder, SAFETENSORS_FILE, sizes[SAFETENSORS_FILE])
        return Headers(where, config, entries, sizes[SAFETENSORS_FILE])
    if SAFETENSORS_INDEX in sizes:
        index = _read_json(folder, SAFETENSORS_INDEX, sizes[SAFETENSORS_INDEX], "shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{where}/{SAFETENSORS_INDEX}: invalid shard index (no weight_map)")
        shards: dict[str, dict[str, Entry]] = {}
        entries: dict[str, Entry] = {}
        for key, shard in weight_map.items():
            if not shard_name_ok(shard):
                raise InputError(
                    f"{where}/{SAFETENSORS_INDEX}: shard {shard!r} is not a file in the "
                    "checkpoint folder"
                )
            if shard not in shards:
                if shard not in sizes:
                    raise InputError(f"{where}/{SAFETENSORS_INDEX}: shard {shard!r} is missing")
                shards[shard] = read_file_header(folder, shard, sizes[shard])
            if key not in shards[shard]:
                raise InputError(f"{where}/{shard}: tensor {key!r} listed in the index is missing")
            entries[key] = shards[shard][key]
        return Headers(where, config, entries, sum(sizes[s] for s in shards))
    if any(name in sizes for name in PICKLED_FILES):
        raise InputError(
            f"{where}: a pickled checkpoint has no header to plan from; convert it to safetensors"
        )
    raise InputError(f"{where}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")


def read_file_header(folder: Folder, name: str, size: int) -> dict[str, Entry]:
    where = f"{folder.where.rstrip('/')}/{name}"
    length = header_length(where, folder.read(name, 0, 8), size)
    raw = folder.read(name, 8, length)
    if len(raw) != length:
        raise InputError(f"{where}: corrupt safetensors header (truncated)")
    return parse_header(where, raw, size - 8 - length)


def _read_json(folder: Folder, name: str, size: int, what: str) -> dict:
    where = f"{folder.where.rstrip('/')}/{name}"
    if size > MAX_JSON_BYTES:
        raise InputError(f"{where}: {what} is larger than {MAX_JSON_BYTES >> 20} MiB")
    return parse_json(where, folder.read(name, 0, size))
