"""The recipe search: fuse candidate recipes, score each on held-out calibration data, keep
the best. The regularizer sweep is the search whose only free axis is the solver point.

- Everything is prepared once: the parents are opened once, and the activations are
  collected once per model, with every tap any candidate needs, when the first candidate that
  needs them comes up (weights-only candidates never pay for them).
- Cheap first, in two phases. Screen: every structure (anchor x alignment x residual x
  heads) at one solver point (an auto search: `SCREEN_POINT`, a soft point where the best
  recipes sit; a regularizer sweep: EMD, one solve per space), weights before activations.
  Refine: the other solver points of the best structures, best first. The budget (points,
  seconds) stops it; the first candidate always runs.
- Candidates are scored in memory: the fused tensors are loaded into a live model of the
  anchor's architecture (one per anchor, reused), never written to disk; only the chosen one
  is written, by the caller.
- Calibration data only: eval data never takes part (`fuse_job` does not pass it here).
  Classifiers rank by calibration accuracy (ties: lower loss), language models by loss; a
  tie keeps the candidate tried first (the cheaper).
- A candidate the family forbids (cross heads under rotary embeddings, weighted residuals
  without taps) is skipped, with the reason, and does not count against the budget.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .activations import load_live_model
from .api import (
    Fused,
    Prepared,
    ProgressCallback,
    add_activations,
    fuse_prepared,
    fuse_tensors,
    write_fused,
)
from .contract import SCREEN_POINT, Point, Recipe, SearchSpace
from .engine import check_attention_policy
from .errors import InputError, check_cancelled
from .evaluate import EvalSet, metrics_from_scores, model_scores
from .families import Merge, canonical_name
from .metrics import LANGUAGE_MODELING, SweepPoint, primary_metric
from .progress import Progress


def calibration_key(metrics: dict[str, float], task: str) -> tuple[float, ...]:
    """Larger is better: accuracy then -loss for classifiers; -loss for language models."""
    if task in LANGUAGE_MODELING:
        return (-metrics["loss"],)
    return (metrics["accuracy"], -metrics["loss"])


@dataclass
class SearchResult:
    points: list[SweepPoint]  # in the order tried
    chosen: int  # index into points
    # the chosen fusion in memory; None when there was one candidate, nothing to score: it is
    # fused straight to disk by write_chosen, streaming (no whole model held)
    fused: Fused | None
    prepared: Prepared  # prepared around the chosen anchor
    reason: str  # why it was chosen, for people
    runner_up: int | None = None
    stopped_by: str | None = None  # "points" | "seconds" | None: every candidate was tried
    skipped: list[dict] = field(default_factory=list)  # {"recipe": ..., "reason": ...}

    @property
    def recipe(self) -> Recipe:
        return recipe_of(self.points[self.chosen])

    def record(self, space: SearchSpace, selected_on: str | None) -> dict:
        """fusion.json's `search`: the recipe, how it was chosen, and the runner-up."""
        runner = self.points[self.runner_up] if self.runner_up is not None else None
        return {
            **space.to_dict(),
            "selected_on": selected_on,
            "chosen": self.recipe.to_dict(),
            "calib": self.points[self.chosen].calib,
            "why": self.reason,
            "runner_up": (
                {"recipe": recipe_of(runner).to_dict(), "calib": runner.calib} if runner else None
            ),
            "tried": len(self.points),
            "stopped_by": self.stopped_by,
        }


def recipe_of(point: SweepPoint) -> Recipe:
    return Recipe(
        point.anchor, point.alignment, point.residual, point.heads, point.solver, point.reg
    )


def write_chosen(
    result: SearchResult,
    out: Path,
    space: SearchSpace,
    selected_on: str | None,
    metrics: dict | None = None,
    keep_plans: bool = False,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
):
    """The chosen fusion as a checkpoint folder; its fusion.json says how it was chosen. A
    single candidate is fused here, streaming layer by layer to `out` (`progress` and
    `should_cancel` are that fusion's)."""
    searched = len(result.points) > 1 or (space.mode != "fixed" and space.is_search)
    search = result.record(space, selected_on) if searched else None
    if search is None:
        search = {**space.to_dict(), "chosen": result.recipe.to_dict(), "why": space.reason}
    if result.fused is None:
        spec = result.recipe.as_spec(result.prepared.spec)
        report = fuse_prepared(
            result.prepared, out, spec, progress, should_cancel, metrics, keep_plans, search
        )
        result.points[result.chosen].seconds = round(report.seconds, 3)
        return report
    return write_fused(result.prepared, result.fused, out, metrics, keep_plans, search)


Scorer = Callable[[Recipe, torch.nn.Module, EvalSet], dict[str, float]]


def run_search(
    prepared: Prepared,
    space: SearchSpace,
    calib: EvalSet | None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    score: Scorer | None = None,
) -> SearchResult:
    """Fuse the candidates of `space` in order, cheap first, within its budget; score each on
    `calib`; return the best in memory. With one candidate `calib` may be None."""
    say = progress or (lambda _p: None)
    anchors = _anchors(prepared, space)
    screen, refine = _candidates(space, anchors)
    planned = min(space.budget, len(screen) + sum(len(v) for v in refine.values()))
    if planned > 1 and calib is None:
        raise InputError("a recipe search needs calibration data (--calib-data)")
    searching = planned > 1
    scorer = score or (
        lambda recipe, model, data: score_recipe(recipe, model, data, device, should_cancel)
    )
    live = _LiveModels(device)
    started = time.perf_counter()
    points: list[SweepPoint] = []
    keys: list[tuple[float, ...]] = []
    skipped: list[dict] = []
    best: tuple[tuple[float, ...], int, Fused | None, Prepared] | None = None
    stopped_by: str | None = None

    def stop() -> str | None:
        if not points:
            return None
        if len(points) >= space.budget:
            return "points"
        if space.seconds is not None and time.perf_counter() - started >= space.seconds:
            return "seconds"
        return None

    def attempt(recipe: Recipe, phase: str) -> bool:
        nonlocal best
        check_cancelled(should_cancel, "recipe search")
        k = len(points)
        total = max(planned, k + 1)
        spec = recipe.as_spec(prepared.spec)
        try:
            around = prepared.with_anchor(recipe.anchor)
            _check_recipe(around, spec)
        except InputError as error:
            if not searching:
                raise
            skipped.append({"recipe": recipe.to_dict(), "reason": error.reason})
            return False
        label = f"recipe {k + 1}/{total} ({recipe.label})"

        def inner(p: Progress) -> None:
            if not searching:
                say(p)
                return
            say(
                replace(
                    p, stage="search", detail=f"search {label}: {p.detail}", point=k, points=total
                )
            )

        if recipe.needs_activations and prepared.activations is None:
            add_activations(prepared, space.mode != "fixed", inner, should_cancel)
            around = prepared.with_anchor(recipe.anchor)
        if searching:
            say(
                Progress(
                    k,
                    total,
                    f"search: {label}",
                    stage="search",
                    unit="recipe",
                    point=k,
                    points=total,
                )
            )
        clock = time.perf_counter()
        # one candidate: nothing to compare, so write_chosen fuses it streaming instead
        fused = fuse_tensors(around, spec, inner, should_cancel) if searching else None
        calib_metrics: dict[str, float] = {}
        if calib is not None and searching:
            calib_metrics = scorer(recipe, live.load(around, fused), calib)
        seconds = time.perf_counter() - clock
        points.append(
            SweepPoint(
                recipe.solver,
                recipe.reg,
                calib_metrics,
                None,
                round(seconds, 3),
                anchor=recipe.anchor,
                alignment=recipe.alignment,
                residual=recipe.residual,
                heads=recipe.heads,
                phase=phase,
            )
        )
        key = calibration_key(calib_metrics, calib.task) if calib_metrics else (0.0,)
        keys.append(key)
        if best is None or key > best[0]:
            best = (key, k, fused, around)
        return True

    for recipe in screen:
        if (stopped_by := stop()) is not None:
            break
        attempt(recipe, "screen")
    if stopped_by is None:
        # refine the structures in the order of their screening scores
        ranked = sorted(range(len(points)), key=lambda i: keys[i], reverse=True)
        for i in ranked:
            for point in refine.get(recipe_of(points[i]).structure, []):
                if (stopped_by := stop()) is not None:
                    break
                attempt(replace(recipe_of(points[i]), solver=point.solver, reg=point.reg), "refine")
            if stopped_by is not None:
                break
    if best is None:
        reasons = "; ".join(s["reason"] for s in skipped)
        raise InputError(f"no recipe of the search can fuse these models: {reasons}")
    points[best[1]].chosen = True
    order = sorted(range(len(points)), key=lambda i: keys[i], reverse=True)
    runner_up = order[1] if len(order) > 1 else None
    if searching:
        say(Progress(len(points), len(points), "search: done", stage="search", unit="recipe"))
    reason = _reason(points, best[1], runner_up, calib, stopped_by)
    return SearchResult(points, best[1], best[2], best[3], reason, runner_up, stopped_by, skipped)


def _reason(points, chosen, runner_up, calib, stopped_by) -> str:
    if calib is None or len(points) == 1:
        return "the only recipe tried" + (f" (the {stopped_by} budget)" if stopped_by else "")
    metric = primary_metric(calib.task)

    def value(i: int) -> str:
        return f"{points[i].calib.get(metric, float('nan')):.4f}"

    text = (
        f"best calibration {metric} ({value(chosen)}) among {len(points)} recipes tried"
        f"{f' (stopped by the {stopped_by} budget)' if stopped_by else ''}"
    )
    if runner_up is not None:
        text += f"; runner-up: {recipe_of(points[runner_up]).label} ({value(runner_up)})"
    return text


def _anchors(prepared: Prepared, space: SearchSpace) -> tuple[int, ...]:
    """The anchors to try: the space's, or every model when they have equal shapes (the
    prepared anchor first)."""
    if space.anchors is not None:
        return space.anchors
    first = prepared.spec.anchor
    if not prepared.equal_shapes:
        return (first,)
    return (first, *[i for i in range(len(prepared.parents)) if i != first])


def _candidates(
    space: SearchSpace, anchors: tuple[int, ...]
) -> tuple[list[Recipe], dict[tuple, list[Point]]]:
    """The screening candidates, cheap first, and the solver points left for refining each
    structure."""
    if space.mode == "list":  # as listed, weights-only ones first
        return sorted(space.recipes, key=lambda r: r.needs_activations), {}
    points = list(space.points)
    if space.mode == "auto" and SCREEN_POINT in points:
        first = SCREEN_POINT
    else:
        first = Point("emd") if Point("emd") in points else points[0]
    rest = [p for p in points if p != first]
    screen = [
        Recipe(anchor, alignment, residual, heads, first.solver, first.reg)
        for alignment in space.alignments
        for anchor in anchors
        for residual in space.residuals
        for heads in space.heads
    ]
    screen.sort(key=lambda r: r.needs_activations)  # stable: weights-only first
    return screen, {r.structure: rest for r in screen}


def _check_recipe(prepared: Prepared, spec) -> None:
    """What the family forbids for this recipe, before any work."""
    check_attention_policy([n for _, n in prepared.nodes], spec, prepared.parents[spec.anchor])
    if spec.residual.startswith("weighted"):
        merges = [n for _, n in prepared.nodes if isinstance(n, Merge)]
        if any(t is None for n in merges for t in (n.residual_tap, n.branch_tap)):
            family = prepared.parents[spec.anchor].family.name
            raise InputError(f"{family}: residual policy {spec.residual} needs taps")


def score_recipe(
    recipe: Recipe, model: torch.nn.Module, data: EvalSet, device: str, cancelled=None
) -> dict[str, float]:
    """A candidate's metrics on the calibration data (`model` holds its fused tensors)."""
    scores = model_scores(model, data, device, should_cancel=cancelled)
    return metrics_from_scores(scores, data.task)


class _LiveModels:
    """One live model per anchor, loaded once; each candidate's tensors are copied in."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.models: dict[int, tuple[torch.nn.Module, dict[str, list[str]]]] = {}
        self.scratch: Path | None = None

    def load(self, prepared: Prepared, fused: Fused) -> torch.nn.Module:
        anchor = prepared.parents[fused.spec.anchor]
        if anchor.index not in self.models:
            model = load_live_model(anchor.path, anchor.architecture, self.device)
            live_keys: dict[str, list[str]] = {}
            for key in model.state_dict():
                live_keys.setdefault(canonical_name(anchor.family, key), []).append(key)
            self.models[anchor.index] = (model, live_keys)
        model, live_keys = self.models[anchor.index]
        tensors = fused.result.tensors
        if not set(tensors) <= set(live_keys):  # a name the live model spells otherwise
            return self._from_disk(prepared, fused)
        state = model.state_dict()
        with torch.no_grad():
            for name, tensor in tensors.items():
                for key in live_keys[name]:
                    state[key].copy_(tensor)
        return model

    def _from_disk(self, prepared: Prepared, fused: Fused) -> torch.nn.Module:
        """Write the candidate and load it as transformers would (a fallback)."""
        folder = Path(tempfile.mkdtemp(prefix="otfuse-candidate-"))
        try:
            write_fused(prepared, fused, folder / "model")
            anchor = prepared.parents[fused.spec.anchor]
            return load_live_model(folder / "model", anchor.architecture, self.device)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
