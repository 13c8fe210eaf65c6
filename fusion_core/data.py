"""Data files: safetensors of tensors named after the model's forward arguments."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import InputError
from .families import Family

LABELS = "labels"


def load_data(path: str | Path, family: Family) -> dict[str, torch.Tensor]:
    """Read and check a data file against the family's forward arguments."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: data file not found")
    try:
        data = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{file}: not a readable safetensors file ({exc})") from exc
    allowed = (*family.inputs, LABELS)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise InputError(
            f"{file}: unexpected tensor(s) {', '.join(unknown)} for a {family.name} model "
            f"(expected {', '.join(allowed)})"
        )
    required = family.inputs[0]
    if required not in data:
        raise InputError(f"{file}: missing tensor {required!r}")
    count = data[required].shape[0]
    for name, tensor in data.items():
        if tensor.ndim == 0 or tensor.shape[0] != count:
            raise InputError(
                f"{file}: tensor {name!r} has {tuple(tensor.shape)}, expected {count} rows"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{file}: tensor {name!r} contains NaN or inf values")
    if count == 0:
        raise InputError(f"{file}: no examples")
    return data


def batches(data: dict[str, torch.Tensor], batch_size: int, limit: int | None = None):
    """Yield dicts of at most batch_size rows, the first `limit` examples in order."""
    count = next(iter(data.values())).shape[0]
    if limit is not None:
        count = min(count, limit)
    for start in range(0, count, batch_size):
        yield {k: v[start : min(start + batch_size, count)] for k, v in data.items()}
