"""Activations at the taps of a flow graph: every token is a sample (sec. 4.3).

Padded positions are dropped via the attention mask; ViT tokens can be filtered to the class
token or a centred window of patches. The same seeded subset of tokens is kept for every
model, so neuron i of one model and neuron j of another are compared on the same inputs.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path

import torch

from .data import LABELS, batches
from .errors import InputError, check_cancelled
from .families import Family, Tap, canonical_name
from .models import ParentModel
from .streamed import streamed_model

BATCH_SIZE = 32


class _AllTapped(Exception):
    """Every tap of the batch is stored: the rest of the forward pass is skipped."""


class SpilledTaps(Mapping):
    """One model's activations, tap -> (tokens, n) float32, kept in a scratch folder (one
    file per tap, appended batch by batch as they were collected) and read when a tap is
    asked for. The engine holds the taps of the layer it aligns, not every layer's: at 1B
    scale and 8k tokens the taps of one layer are ~0.5 GB, of all 16 layers ~9 GB a model.
    The folder is removed with the last reference to this mapping."""

    def __init__(
        self,
        folder,
        files: dict[Tap, tuple[Path, int, int]],
        device: str,
        inline: dict[Tap, torch.Tensor],
    ) -> None:
        self._folder = folder  # a tempfile.TemporaryDirectory: removed when this is freed
        self._files = files
        self._device = device
        self._inline = inline  # taps on parameters: the weights' rows, held

    def __getitem__(self, tap: Tap) -> torch.Tensor:
        if tap in self._inline:
            return self._inline[tap]
        path, rows, width = self._files[tap]
        values = torch.from_file(str(path), shared=False, size=rows * width, dtype=torch.float32)
        return values.reshape(rows, width).to(self._device)

    def __iter__(self):
        return iter([*self._inline, *self._files])

    def __len__(self) -> int:
        return len(self._inline) + len(self._files)


def load_live_model(path: Path, architecture: str, device: str = "cpu") -> torch.nn.Module:
    """Instantiate a checkpoint folder with transformers (safetensors only) in eval mode."""
    import transformers  # ~1 s of import: only where a live model is built

    model_class = getattr(transformers, architecture)
    try:
        model = model_class.from_pretrained(str(path), use_safetensors=True)
    except Exception as exc:
        raise InputError(f"{path}: transformers cannot load it as {architecture}: {exc}") from exc
    return model.to(device).eval()


def module_paths(model: torch.nn.Module, family: Family) -> dict[str, str]:
    """Canonical module path -> live module path, via the live model's own state-dict keys."""
    paths = {}
    for key in model.state_dict():
        module, _, leaf = key.rpartition(".")
        canonical_module, _, _ = canonical_name(family, key).rpartition(".")
        if leaf in ("weight", "bias"):
            paths[canonical_module] = module
    return paths


def _token_mask(
    batch: dict, family: Family, seq_len: int, grid: bool, spec_filter: str, window: int | None
) -> torch.Tensor:
    """(batch, seq) bool mask of the tokens that count as samples."""
    size = batch[family.inputs[0]].shape[0]
    if seq_len == 1:  # pooled outputs: one vector per example
        return torch.ones(size, 1, dtype=torch.bool)
    if family.token_layout == "text":
        mask = batch.get("attention_mask")
        if mask is None:
            return torch.ones(size, seq_len, dtype=torch.bool)
        return mask.bool()
    mask = torch.zeros(size, seq_len, dtype=torch.bool)
    offset = 0 if grid else 1  # patch-grid taps (the projection) carry no class token
    patches = seq_len - offset
    side = math.isqrt(patches)
    if spec_filter == "cls" and not grid:
        mask[:, 0] = True
    elif window is not None and side * side == patches and window <= side:
        lo = (side - window) // 2
        rows = torch.arange(lo, lo + window)
        idx = (rows[:, None] * side + rows[None, :]).flatten() + offset
        mask[:, idx] = True
    else:
        mask[:] = True
    return mask


def _as_tokens(value: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Activations as (batch, seq, n); conv outputs (batch, n, h, w) become a patch grid."""
    if value.ndim == 4:
        return value.flatten(2).transpose(1, 2), True
    if value.ndim == 2:
        return value[:, None, :], False
    return value, False


def collect(
    parent: ParentModel,
    taps: list[Tap],
    data: dict[str, torch.Tensor],
    samples: int,
    max_tokens: int,
    spec_filter: str,
    window: int | None,
    device: str,
    should_cancel=None,
) -> Mapping[Tap, torch.Tensor]:
    """Run one model over the data and return (tokens, n) activations per tap, on device:
    spilled to a scratch folder batch by batch (`SpilledTaps`), so neither the collection
    nor the fusion holds every layer's taps at once."""
    family = parent.family
    module_taps = [t for t in taps if t.where != "param"]
    if not module_taps:  # weights as features: no forward pass
        return {t: _param_rows(parent, t.name, device) for t in taps}

    # weights read module by module as the forward reaches them (bounded memory at scale)
    streamed = streamed_model(parent, device)
    model = streamed.model
    paths = module_paths(model, family)
    folder = tempfile.TemporaryDirectory(prefix="otfuse-activations-")
    files: dict[Tap, tuple[Path, int, int]] = {}
    current: dict[str, torch.Tensor] = {}
    fired: set[Tap] = set()  # the taps stored in this batch
    hooks = []

    def store(tap: Tap, value: torch.Tensor) -> None:
        fired.add(tap)
        tokens, grid = _as_tokens(value.detach())
        mask = _token_mask(current, family, tokens.shape[1], grid, spec_filter, window)
        chosen = tokens[mask.to(tokens.device)]
        budget = current["_budget"]
        if chosen.shape[0] > budget:
            gen = torch.Generator().manual_seed(int(current["_seed"]))
            keep = torch.randperm(chosen.shape[0], generator=gen)[:budget].sort().values
            chosen = chosen[keep.to(chosen.device)]
        chosen = chosen.float().cpu().contiguous()
        path, rows, width = files.get(tap) or (Path(folder.name) / f"{len(files)}.f32", 0, 0)
        if width and chosen.shape[1] != width:
            raise InputError(f"{parent.label}: {tap.name!r} changed width between batches")
        with path.open("ab") as handle:
            chosen.numpy().tofile(handle)  # no bytes copy of a chunk that may be 100s of MB
        files[tap] = (path, rows + chosen.shape[0], chosen.shape[1])
        if len(fired) == len(module_taps):  # what follows (an LM head's logits over the whole
            raise _AllTapped  # vocabulary: GBs at scale) is not needed

    for tap in module_taps:
        if tap.name not in paths:
            raise InputError(f"{parent.label}: no module for {tap.name!r} in the loaded model")
        module = model.get_submodule(paths[tap.name])
        if tap.where == "out":
            hooks.append(module.register_forward_hook(lambda _m, _a, out, t=tap: store(t, out)))
        else:

            def pre(_m, args, kwargs, t=tap):
                store(t, args[0] if args else next(iter(kwargs.values())))

            hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    count = min(samples, next(iter(data.values())).shape[0])
    num_batches = math.ceil(count / BATCH_SIZE)
    try:
        with torch.no_grad():
            for number, batch in enumerate(batches(data, BATCH_SIZE, count)):
                check_cancelled(should_cancel)
                inputs = {k: v.to(device) for k, v in batch.items() if k != LABELS}
                current.clear()
                current.update(batch)
                current["_budget"] = max(1, max_tokens // num_batches)
                current["_seed"] = number
                fired.clear()
                with suppress(_AllTapped):
                    model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
        streamed.close()
    del model
    params = {t: _param_rows(parent, t.name, device) for t in taps if t.where == "param"}
    return SpilledTaps(folder, files, device, params)


def _param_rows(parent: ParentModel, name: str, device: str) -> torch.Tensor:
    """A weight as features (a tap on a parameter): its rows, float32."""
    value = parent.tensor(name).float()
    return value.reshape(-1, value.shape[-1]).to(device)
