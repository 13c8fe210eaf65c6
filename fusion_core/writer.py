"""Write a fused checkpoint folder atomically: a reader never sees half a checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import InputError
from .files import SAFETENSORS_FILE, SIDE_FILES
from .models import ParentModel


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


def write_checkpoint(
    out: Path,
    anchor: ParentModel,
    tensors: dict[str, torch.Tensor],
    fusion_record: dict,
    model_card: str,
) -> None:
    """Fused tensors (canonical names) + the anchor's buffers, config and side files."""
    check_output_dir(out)
    state = {serialized_key(anchor, name): t.contiguous() for name, t in tensors.items()}
    for name in anchor.family.buffer_names(anchor.config_value("layers")):
        if anchor.has(name):
            state[serialized_key(anchor, name)] = anchor.tensor(name).contiguous()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _dedupe_shared(state)
        save_file(state, str(tmp / SAFETENSORS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(anchor.checkpoint.config, indent=2) + "\n")
        for name in SIDE_FILES:
            if (anchor.path / name).is_file():
                shutil.copy2(anchor.path / name, tmp / name)
        (tmp / "fusion.json").write_text(json.dumps(fusion_record, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dedupe_shared(state: dict[str, torch.Tensor]) -> None:
    """safetensors refuses tensors sharing memory (tied weights): store copies."""
    seen: dict[int, str] = {}
    for key, tensor in state.items():
        ptr = tensor.data_ptr()
        if ptr in seen:
            state[key] = tensor.clone()
        else:
            seen[ptr] = key
