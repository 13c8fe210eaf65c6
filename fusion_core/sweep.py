"""The regularizer sweep: the recipe search (`search.py`) with every axis fixed but the
solver point. Costs are max-normalized to [0, 1], so one grid suits every model: `auto` is
EMD plus five log-spaced Sinkhorn values from 0.01 to 0.3.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from .api import Prepared
from .contract import Point, SearchSpace
from .evaluate import EvalSet
from .search import SearchResult, calibration_key, run_search

__all__ = ["calibration_key", "run_sweep", "save_transport_maps"]


def run_sweep(
    prepared: Prepared, points: Sequence[Point], calib: EvalSet | None, **options
) -> SearchResult:
    """Fuse `prepared` once per point, keep the best one-shot fusion on `calib` (in memory)."""
    space = replace(
        SearchSpace.fixed(prepared.spec, points), budget=max(1, len(points)), seconds=None
    )
    return run_search(prepared, space, calib, **options)


def save_transport_maps(maps: dict[str, torch.Tensor], path: Path, anchor: int) -> Path:
    """Plans as safetensors, keys "model<i>/<space>"; a plan shared by several keys is stored
    once and the others are listed in the metadata as aliases."""
    from safetensors.torch import save_file

    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for key, plan in maps.items():
        ptr = plan.data_ptr()
        if ptr in seen:
            aliases[key] = seen[ptr]
        else:
            seen[ptr] = key
            unique[key] = plan.detach().float().cpu().contiguous()
    metadata = {
        "format": "otfuse-transport-maps",
        "anchor": str(anchor),
        "convention": "plan[i, j]: mass from model neuron i to anchor neuron j; total mass 1",
        "aliases": json.dumps(aliases),
    }
    save_file(unique, str(path), metadata=metadata)
    return path
