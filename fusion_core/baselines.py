"""Baselines a fused model is judged against: each parent, their ensemble (the mean of their
probabilities) and vanilla fusion (plain averaging, for models of equal shapes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .api import Prepared, ProgressCallback, fuse_prepared
from .errors import IncompatibleModelsError, check_cancelled
from .evaluate import EvalSet, Scores, ensemble_scores, metrics_from_scores, model_scores
from .metrics import ModelResult
from .progress import Progress


def parents_and_ensemble(
    parent_dirs: list[str | Path],
    eval_set: EvalSet,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[ModelResult]:
    """Each parent's metrics and the ensemble's (mean of the parents' probabilities; for MLM
    the mean probability of each masked token's label), all on the same masked tokens."""
    report = progress or (lambda _p: None)
    results, members = [], []
    for i, folder in enumerate(parent_dirs):
        check_cancelled(should_cancel, "evaluation")
        report(
            Progress(
                i,
                len(parent_dirs) + 1,
                f"evaluating parent {i + 1}/{len(parent_dirs)}",
                stage="evaluating",
                unit="model",
            )
        )
        scores: Scores = model_scores(folder, eval_set, device, should_cancel=should_cancel)
        members.append(scores)
        results.append(
            ModelResult(
                f"parent {i}", "parent", metrics_from_scores(scores, eval_set.task), str(folder)
            )
        )
    results.append(
        ModelResult(
            "ensemble", "ensemble", metrics_from_scores(ensemble_scores(members), eval_set.task)
        )
    )
    return results


def vanilla_fusion(
    prepared: Prepared,
    out: Path,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> str | None:
    """Write the vanilla fusion (plain weighted average) of the prepared parents at `out`.
    Returns None, or why it cannot be made (models of different widths)."""
    # vanilla ignores the residual policy; "average" keeps the engine off the shared-stream
    # path, which expects OT plans
    spec = replace(prepared.spec, method="vanilla", residual="average")
    try:
        fuse_prepared(prepared, out, spec, progress, should_cancel)
    except IncompatibleModelsError as exc:
        return f"vanilla fusion needs models of equal shapes: {exc}"
    return None
