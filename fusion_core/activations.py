"""Activations at the taps of a flow graph: every token is a sample (sec. 4.3).

Padded positions are dropped via the attention mask; ViT tokens can be filtered to the class
token or a centred window of patches. The same seeded subset of tokens is kept for every
model, so neuron i of one model and neuron j of another are compared on the same inputs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch
import transformers

from .data import LABELS, batches
from .errors import InputError, check_cancelled
from .families import Family, Tap, canonical_name
from .models import ParentModel

BATCH_SIZE = 32


def load_live_model(path: Path, architecture: str, device: str = "cpu") -> torch.nn.Module:
    """Instantiate a checkpoint folder with transformers (safetensors only) in eval mode."""
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
) -> dict[Tap, torch.Tensor]:
    """Run one model over the data and return (tokens, n) activations per tap, on device."""
    family = parent.family
    result: dict[Tap, torch.Tensor] = {}
    module_taps = [t for t in taps if t.where != "param"]
    for tap in taps:
        if tap.where == "param":
            value = parent.tensor(tap.name).float()
            result[tap] = value.reshape(-1, value.shape[-1]).to(device)
    if not module_taps:
        return result

    model = load_live_model(parent.path, parent.architecture, device)
    paths = module_paths(model, family)
    gathered: dict[Tap, list[torch.Tensor]] = defaultdict(list)
    current: dict[str, torch.Tensor] = {}
    hooks = []

    def store(tap: Tap, value: torch.Tensor) -> None:
        tokens, grid = _as_tokens(value.detach())
        mask = _token_mask(current, family, tokens.shape[1], grid, spec_filter, window)
        chosen = tokens[mask.to(tokens.device)]
        budget = current["_budget"]
        if chosen.shape[0] > budget:
            gen = torch.Generator().manual_seed(int(current["_seed"]))
            keep = torch.randperm(chosen.shape[0], generator=gen)[:budget].sort().values
            chosen = chosen[keep.to(chosen.device)]
        gathered[tap].append(chosen.float())

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
                model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    for tap, chunks in gathered.items():
        result[tap] = torch.cat(chunks).to(device)
    del model
    return result
