"""Write a fused checkpoint folder atomically, tensor by tensor: a reader never sees half a
checkpoint, and the writer never holds more than the rows it is given.

Every output tensor's name, dtype and shape are the anchor's, known from its headers before
anything is fused. So the shard files are laid out up front the way Hugging Face shards
(`model-00001-of-0000N.safetensors` in tensor order, a new shard when the next tensor would
pass `max_shard_size`, one `model.safetensors` when all fit one shard, and
`model.safetensors.index.json` otherwise): each file gets its final header and size at once,
and every tensor, or block of its rows, is written in place at its offset when it is
produced. The folder is a temporary sibling of the output, renamed to it when complete.
Writes happen on a thread of their own, so the engine computes the next layer while this
one goes to disk; at most `WRITE_AHEAD_BYTES` wait for it (plus one larger block).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import SAFETENSORS_DTYPES
from .errors import InputError
from .files import SAFETENSORS_FILE, SAFETENSORS_INDEX, SIDE_FILES
from .models import ParentModel
from .spec import DEFAULT_MAX_SHARD_SIZE

WRITE_AHEAD_BYTES = 64 << 20


def check_output_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: output exists and is not an empty folder")
    if not out.parent.exists():
        raise InputError(f"{out.parent}: parent folder of --out does not exist")


def serialized_key(anchor: ParentModel, name: str) -> str:
    """The anchor's own key for a tensor, with legacy gamma/beta written the modern way."""
    key = anchor.keys[name]
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


@dataclass
class _Slot:
    """One output tensor's place: its shard file and absolute byte range there."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: int
    start: int
    nbytes: int
    written: int = 0


class _WriteBehind:
    """Blocks written in order by one thread. At most `limit` bytes wait (a larger block
    waits alone); a failed write (a full disk) is raised to the producer when it waits for
    that block, at the latest at `flush`. `close` drops what has not started."""

    def __init__(self, limit: int = WRITE_AHEAD_BYTES) -> None:
        self._limit = limit
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="otfuse-writer")
        self._queued: deque[tuple[Future, int]] = deque()
        self._bytes = 0

    def put(self, fd: int, offset: int, data: memoryview, owner: torch.Tensor) -> None:
        """Queue `data` (a view of `owner`, which the caller no longer changes)."""
        while self._queued and self._bytes + len(data) > self._limit:
            self._wait_oldest()
        self._queued.append((self._pool.submit(_write_all, fd, offset, data, owner), len(data)))
        self._bytes += len(data)

    def flush(self) -> None:
        while self._queued:
            self._wait_oldest()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._queued.clear()

    def _wait_oldest(self) -> None:
        future, size = self._queued.popleft()
        self._bytes -= size
        future.result()


def _write_all(fd: int, offset: int, data: memoryview, _owner: torch.Tensor) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SAFETENSORS_FILE]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


class CheckpointWriter:
    """A fused checkpoint folder in the making: `write` tensors (whole, or blocks of rows in
    any order) under canonical names, then `publish`; leaving it unpublished (an exception
    in a `with` block, or `abort`) removes everything written."""

    def __init__(
        self,
        out: Path,
        anchor: ParentModel,
        names: list[str],
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    ) -> None:
        out = Path(out)
        check_output_dir(out)
        self.out, self.anchor = out, anchor
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        self.slots: dict[str, _Slot] = {}  # canonical name -> its place
        self.bytes_written = 0
        self._behind = _WriteBehind()
        try:
            self._layout(names, max_shard_size)
        except BaseException:
            self.abort()
            raise

    @property
    def total_bytes(self) -> int:
        return sum(slot.nbytes for slot in self.slots.values())

    def _layout(self, names: list[str], max_shard_size: int) -> None:
        checkpoint = self.anchor.checkpoint
        shards: list[list[_Slot]] = [[]]
        size = 0
        for name in dict.fromkeys(names):
            key = self.anchor.keys[name]
            dtype, shape = checkpoint.dtype(key), checkpoint.shape(key)
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            key = serialized_key(self.anchor, name)
            slot = _Slot(key, dtype, shape, len(shards) - 1, 0, nbytes)
            shards[-1].append(slot)
            self.slots[name] = slot
            size += nbytes
        self.files = [self.tmp / name for name in shard_names(len(shards))]
        self._fds: list[int] = []
        for file, slots in zip(self.files, shards, strict=True):
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            # wider elements first, as safetensors orders them: every tensor stays aligned
            for slot in sorted(slots, key=lambda s: -s.dtype.itemsize):
                header[slot.key] = {
                    "dtype": SAFETENSORS_DTYPES[slot.dtype],
                    "shape": list(slot.shape),
                    "data_offsets": [offset, offset + slot.nbytes],
                }
                slot.start = offset
                offset += slot.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
            fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(fd, 8 + len(raw) + offset)
            for slot in slots:
                slot.start += 8 + len(raw)

    def write(self, name: str, tensor: torch.Tensor, row: int = 0) -> int:
        """Write `tensor` as rows row.. of output tensor `name` (all of it when it has the
        full shape); returns the bytes written."""
        slot = self.slots[name]
        tensor = tensor.detach().to("cpu", slot.dtype).contiguous()
        if tuple(tensor.shape[1:]) != slot.shape[1:] or (not slot.shape and tensor.dim() != 0):
            raise ValueError(f"{name}: rows of shape {tuple(tensor.shape)} for {slot.shape}")
        row_bytes = slot.nbytes // slot.shape[0] if slot.shape and slot.shape[0] else 0
        data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        if row * row_bytes + len(data) > slot.nbytes:
            raise ValueError(f"{name}: rows {row}+{len(tensor)} past {slot.shape}")
        self._behind.put(self._fds[slot.shard], slot.start + row * row_bytes, data, tensor)
        slot.written += len(data)
        self.bytes_written += len(data)
        return len(data)

    def publish(self, fusion_record: dict, model_card: str) -> list[str]:
        """Check every tensor was written in full, add the index, config, side files, the
        recipe and the card, and move the folder to `out`. Returns the weight files."""
        try:
            self._behind.flush()
            missing = [s.key for s in self.slots.values() if s.written != s.nbytes]
            if missing:
                raise RuntimeError(f"fused checkpoint incomplete: {missing[:3]} not written")
            self._close()
            names = [f.name for f in self.files]
            if len(self.files) > 1:
                index = {
                    "metadata": {"total_size": self.total_bytes},
                    "weight_map": {s.key: names[s.shard] for s in self.slots.values()},
                }
                (self.tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            config = json.dumps(self.anchor.checkpoint.config, indent=2) + "\n"
            (self.tmp / "config.json").write_text(config)
            for name in SIDE_FILES:
                if (self.anchor.path / name).is_file():
                    shutil.copy2(self.anchor.path / name, self.tmp / name)
            (self.tmp / "fusion.json").write_text(json.dumps(fusion_record, indent=2) + "\n")
            (self.tmp / "README.md").write_text(model_card)
            if self.out.exists():
                self.out.rmdir()  # empty, checked at the start
            os.replace(self.tmp, self.out)
            return names
        except BaseException:
            self.abort()
            raise

    def _close(self) -> None:
        if hasattr(self, "_behind"):
            self._behind.close()
        for fd in getattr(self, "_fds", []):
            os.close(fd)
        self._fds = []

    def abort(self) -> None:
        self._close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()


def write_checkpoint(
    out: Path,
    anchor: ParentModel,
    tensors: dict[str, torch.Tensor],
    fusion_record: dict,
    model_card: str,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> list[str]:
    """Fused tensors held in memory (canonical names) + the anchor's buffers, written as a
    checkpoint folder (a search's chosen candidate; fusions otherwise stream)."""
    buffers = [
        name
        for name in anchor.family.buffer_names(anchor.config_value("layers"))
        if anchor.has(name) and name not in tensors
    ]
    with CheckpointWriter(out, anchor, [*tensors, *buffers], max_shard_size) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        for name in buffers:
            writer.write(name, anchor.tensor(name))
        return writer.publish(fusion_record, model_card)
