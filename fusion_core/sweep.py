"""The regularizer sweep: fuse once per value, keep the best one-shot model on a held-out
calibration split.

Activations do not depend on the solver or its regularizer, so they are collected once
(`api.prepare`) and every point reuses them. Costs are max-normalized to [0, 1], so one grid
suits every model: `auto` is EMD plus five log-spaced Sinkhorn values from 0.01 to 0.3.
Classifiers are ranked by calibration accuracy (ties: lower loss), language models (masked
or causal) by calibration loss.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .api import FusionReport, Prepared, ProgressCallback, fuse_prepared
from .contract import Point
from .errors import InputError
from .evaluate import EvalSet, metrics_from_scores, model_scores
from .metrics import LANGUAGE_MODELING, SweepPoint
from .progress import Progress


def calibration_key(metrics: dict[str, float], task: str) -> tuple[float, ...]:
    """Larger is better: accuracy then -loss for classifiers; -loss for language models."""
    if task in LANGUAGE_MODELING:
        return (-metrics["loss"],)
    return (metrics["accuracy"], -metrics["loss"])


Scorer = Callable[[Path, EvalSet], dict[str, float]]


@dataclass
class SweepResult:
    points: list[SweepPoint]
    chosen: int  # index into points
    folder: Path  # the chosen fused checkpoint (inside the work folder)
    report: FusionReport  # its fusion report (transport maps when kept)


def run_sweep(
    prepared: Prepared,
    points: list[Point],
    workdir: Path,
    calib: EvalSet | None,
    eval_set: EvalSet | None = None,
    keep_plans: bool = False,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    score: Scorer | None = None,
) -> SweepResult:
    """Fuse `prepared` once per point into `workdir`, score each on `calib` and keep only
    the best folder. `eval_set` only adds each point's eval metrics to the curve; it never
    takes part in the choice. With one point, `calib` may be None."""
    if not points:
        raise InputError("the sweep needs at least one regularizer")
    if len(points) > 1 and calib is None:
        raise InputError("a sweep over several regularizers needs calibration data (--calib-data)")
    if calib is not None and eval_set is not None and _same_file(calib.path, eval_set.path):
        raise InputError(
            f"{calib.path}: the calibration data must not be the eval data "
            "(the sweep would choose on the numbers it reports)"
        )
    scorer = score or (lambda folder, data: _score(folder, data, device, should_cancel))
    report = progress or (lambda _p: None)
    results: list[SweepPoint] = []
    best: tuple[tuple[float, ...], int, Path, FusionReport] | None = None
    for i, point in enumerate(points):
        spec = replace(prepared.spec, solver=point.solver, reg=point.reg or prepared.spec.reg)
        folder = workdir / f"candidate-{i}"
        started = time.perf_counter()

        def inner(p: Progress, i=i, point=point) -> None:
            # step/total stay the progress within point i; the event says which point
            prefix = f"sweep {i + 1}/{len(points)} ({point.label}): " if len(points) > 1 else ""
            report(replace(p, detail=prefix + p.detail, point=i, points=len(points)))

        fused = fuse_prepared(prepared, folder, spec, inner, should_cancel, keep_plans=keep_plans)
        seconds = time.perf_counter() - started
        calib_metrics = scorer(folder, calib) if calib is not None else {}
        eval_metrics = scorer(folder, eval_set) if eval_set is not None else None
        results.append(
            SweepPoint(point.solver, point.reg, calib_metrics, eval_metrics, round(seconds, 3))
        )
        key = calibration_key(calib_metrics, calib.task) if calib is not None else (0.0,)
        if best is None or key > best[0]:
            if best is not None:
                shutil.rmtree(best[2], ignore_errors=True)
            best = (key, i, folder, fused)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    assert best is not None
    results[best[1]].chosen = True
    return SweepResult(results, best[1], best[2], best[3])


def _score(folder: Path, data: EvalSet, device: str, cancelled=None) -> dict[str, float]:
    return metrics_from_scores(
        model_scores(folder, data, device, should_cancel=cancelled), data.task
    )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def save_transport_maps(maps: dict[str, torch.Tensor], path: Path, anchor: int) -> Path:
    """Plans as safetensors, keys "model<i>/<space>"; a plan shared by several keys is stored
    once and the others are listed in the metadata as aliases."""
    import json

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
