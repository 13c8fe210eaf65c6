"""A whole fusion job: recipe search -> baselines -> finetune -> artifacts, published
atomically.

    fuse_job(models, out, spec, search=SearchSpace.auto(spec), eval_data=test,
             calib_data=calib, finetune=FinetuneConfig(steps=200, lr=1e-3),
             finetune_data=train, finetune_baselines=("vanilla",), save_transport_maps=True,
             report=True)

`out` receives one HF checkpoint folder: the chosen one-shot OT fusion, or its finetuned
version when a finetune is asked, plus `metrics.json`, optionally `transport_maps.safetensors`
and `report.html`. Everything is built in a work folder beside `out` and renamed into place
at the end: a failed or cancelled job leaves nothing at `out`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .api import FusionReport, ProgressCallback, prepare
from .baselines import parents_and_ensemble, vanilla_fusion
from .checkpoint import open_checkpoint
from .contract import Point, SearchSpace, check_job, parse_regs
from .errors import InputError, check_cancelled
from .evaluate import EvalSet, load_eval_set, metrics_from_scores, model_scores, task_of
from .families import resolve_family
from .finetune import FinetuneConfig, finetune
from .limits import Limits
from .metrics import (
    KINDS,
    REPORT_FILE,
    TRANSPORT_MAPS_FILE,
    Metrics,
    ModelResult,
    Sweep,
    plan_diagnostics,
    primary_metric,
    write_metrics,
)
from .progress import Progress
from .search import run_search, write_chosen
from .spec import FusionSpec
from .sweep import save_transport_maps
from .writer import check_output_dir


@dataclass
class JobResult:
    out: Path
    metrics: dict  # the content of metrics.json
    artifacts: dict[str, Path] = field(default_factory=dict)  # name -> file inside `out`
    fusion: FusionReport | None = None


def fuse_job(
    model_dirs: Sequence[str | Path],
    out: str | Path,
    spec: FusionSpec | None = None,
    *,
    regs: str | float | Sequence[str | float] | None = None,
    search: SearchSpace | None = None,
    data: str | Path | None = None,
    eval_data: str | Path | None = None,
    calib_data: str | Path | None = None,
    finetune_config: FinetuneConfig | None = None,
    finetune_data: str | Path | None = None,
    finetune_baselines: Sequence[str] = (),
    save_maps: bool = False,
    report: bool = False,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    allow_pickle: bool = False,
    limits: Limits | None = None,
    names: Mapping[str, str] | None = None,
    extra_metrics: Callable[[dict], dict] | None = None,
) -> JobResult:
    """Fuse, sweep, evaluate against baselines, optionally finetune, write artifacts.

    - `search`: the recipes to try (`SearchSpace.auto(spec, pinned)`, a list, or None: the
      spec's recipe, swept over `regs`); with more than one the best one-shot model on
      `calib_data` (default: `data`) is kept. The eval data takes no part in the choice.
      Activations the search needs are collected on `data`, else on the calibration data.
    - `regs`: None (the spec's solver and reg), a number, "auto", "emd" or a list: the
      solver points of a fixed recipe (a regularizer sweep).
    - `eval_data`: where parents, ensemble, vanilla, fused (and finetuned) models are
      compared; must differ from the calibration data.
    - `finetune_config` + `finetune_data`: heal the chosen fusion (with `distill` > 0, also
      towards the parents' ensemble); `finetune_baselines` ("vanilla") finetunes vanilla
      fusion with the same budget for comparison.
    - `names`: the caller's names for the paths it gave (a service's URIs for its scratch
      copies), recorded in every artifact instead of the paths.
    - `extra_metrics`: called with the metrics document just before it is written (once);
      what it returns is added to it (a service's own fields).
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    model_dirs = [Path(m) for m in model_dirs]
    spec = (spec or FusionSpec()).validate(len(model_dirs))
    out = Path(out)
    check_output_dir(out)
    reg = spec.reg if spec.solver == "sinkhorn" else None
    points = parse_regs(regs) if regs is not None else [Point(spec.solver, reg)]
    if points == [Point("emd")] or (len(points) == 1 and points[0].solver == "emd"):
        points = [Point("emd")]
    space = search or SearchSpace.fixed(spec, points)
    if space.mode == "fixed" and search is not None and regs is None:
        points = list(space.points)
    searching = space.mode != "fixed" and space.is_search
    if finetune_config is not None:
        finetune_config = finetune_config.validate()
        if finetune_config.device is None:
            finetune_config = dataclasses.replace(finetune_config, device=spec.device)
    # The job contract's rules, on resolved paths (two names of one file are one file).
    chosen_on = check_job(
        method=spec.method,
        points=points if not searching else points[:1],
        search=searching,
        needs_activations=spec.needs_activations or space.needs_activations,
        activations=_resolved(data),
        calibration=_resolved(calib_data),
        eval_data=_resolved(eval_data),
        finetune=finetune_config,
        finetune_data=_resolved(finetune_data),
        baselines=tuple(finetune_baselines),
    )
    calib_file = Path(chosen_on) if chosen_on is not None else None
    if data is None and space.needs_activations:
        data = calib_file  # a search collects its activations on the calibration data

    cancelled = should_cancel or (lambda: False)
    say = progress or (lambda _p: None)

    def enter(stage: str, detail: str) -> None:  # a stage's first event
        say(Progress(0, 1, detail, stage=stage))

    anchor_dir = model_dirs[spec.anchor]
    checkpoint = open_checkpoint(anchor_dir)
    _, architecture = resolve_family(checkpoint.config, where=f"{anchor_dir}: ")
    eval_set = load_eval_set(anchor_dir, eval_data) if eval_data is not None else None
    calib_set = load_eval_set(anchor_dir, calib_file) if calib_file is not None else None
    try:
        task = task_of(architecture)
    except InputError:
        task = "none"

    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".work", dir=out.parent))
    try:
        # 1. fuse each candidate recipe, keep the best on calibration data (eval: not used)
        enter("search" if searching else "aligning", "preparing")
        prepared = prepare(
            model_dirs, spec, data, say, allow_pickle, limits, cancelled, names, not searching
        )
        shown = prepared.name_of
        keep_plans = save_maps or report
        searched = run_search(
            prepared,
            space,
            calib_set,
            device=spec.device,
            progress=say,
            should_cancel=cancelled,
        )
        enter("aligning", "writing the chosen fusion")
        fusion = write_chosen(
            searched,
            work / "fused",
            space,
            shown(calib_file),
            keep_plans=keep_plans,
            progress=say,
            should_cancel=cancelled,
        )
        spec = fusion.spec
        timings["fusion"] = round(time.perf_counter() - clock, 3)

        # 2. baselines on the eval data
        _check(cancelled)
        enter("evaluating", "evaluating parents, ensemble and baselines")
        evaluation: list[ModelResult] = []
        vanilla_dir: Path | None = None
        vanilla_reason: str | None = None
        need_vanilla = eval_set is not None or "vanilla" in finetune_baselines
        if need_vanilla:
            vanilla_dir = work / "vanilla"
            vanilla_reason = vanilla_fusion(searched.prepared, vanilla_dir, None, cancelled)
            if vanilla_reason is not None:
                vanilla_dir = None
        fused_metrics = (
            _metrics(fusion.out, eval_set, spec.device, cancelled) if eval_set is not None else None
        )
        if eval_set is not None:
            evaluation = parents_and_ensemble(model_dirs, eval_set, spec.device, say, cancelled)
            if vanilla_dir is not None:
                evaluation.append(
                    ModelResult(
                        "vanilla",
                        "vanilla",
                        _metrics(vanilla_dir, eval_set, spec.device, cancelled),
                    )
                )
            else:
                evaluation.append(ModelResult("vanilla", "vanilla", skipped=vanilla_reason))
            evaluation.append(ModelResult("fused", "fused", dict(fused_metrics or {})))
        timings["evaluation"] = round(time.perf_counter() - clock - sum(timings.values()), 3)

        # 3. finetune the chosen fusion (and the baselines, same budget)
        published = fusion.out
        finetune_record = None
        if finetune_config is not None:
            _check(cancelled)
            enter("finetuning", "finetuning the fused model")
            runs = []
            jobs = [("fused", fusion.out, fused_metrics)]
            if "vanilla" in finetune_baselines:
                if vanilla_dir is not None:
                    before = next((r.metrics for r in evaluation if r.kind == "vanilla"), None)
                    jobs.append(("vanilla", vanilla_dir, before))
                else:
                    evaluation.append(
                        ModelResult("vanilla+finetune", "vanilla+finetune", skipped=vanilla_reason)
                    )
            for name, source, before in jobs:
                target = work / f"{name}-finetuned"
                result = finetune(
                    source,
                    finetune_data,
                    target,
                    finetune_config,
                    name=name,
                    progress=say,
                    should_cancel=cancelled,
                    teachers=model_dirs,  # distillation's teacher: the parents' ensemble
                )
                run = result.run
                run.before = before
                if eval_set is not None:
                    run.after = _metrics(target, eval_set, spec.device, cancelled)
                    evaluation.append(
                        ModelResult(f"{name}+finetune", f"{name}+finetune", run.after)
                    )
                runs.append(run)
                if name == "fused":
                    published = target
                else:
                    shutil.rmtree(target, ignore_errors=True)
            finetune_record = {
                "config": finetune_config.to_dict(),
                "healing": finetune_config.healing(len(model_dirs)),
                "runs": runs,
            }
            timings["finetune"] = round(time.perf_counter() - clock - sum(timings.values()), 3)

        # 4. artifacts next to the published model, then publish atomically
        _check(cancelled)
        enter("writing", "writing metrics.json and artifacts")
        published_kind = "fused+finetune" if finetune_config is not None else "fused"
        evaluation.sort(key=lambda r: KINDS.index(r.kind))
        for result in evaluation:
            if result.kind == published_kind:
                result.path = "."
            elif result.path is not None:
                result.path = shown(result.path)
        artifacts: dict[str, str] = {"model": "."}
        diagnostics = []
        if fusion.transport_maps is not None:
            diagnostics = plan_diagnostics(fusion.transport_maps, fusion.plans)
            if save_maps:
                save_transport_maps(
                    fusion.transport_maps, published / TRANSPORT_MAPS_FILE, spec.anchor
                )
                artifacts["transport_maps"] = TRANSPORT_MAPS_FILE
        if report:
            artifacts["report"] = REPORT_FILE
        artifacts["metrics"] = "metrics.json"
        timings["total"] = round(time.perf_counter() - clock, 3)
        metrics = Metrics(
            task=task,
            primary_metric=primary_metric(task),
            models=[shown(m) for m in model_dirs],
            anchor=spec.anchor,
            spec=fusion.spec.to_dict(),
            data={
                "eval": shown(eval_data),
                "calib": shown(calib_file),
                "activations": shown(data),
                "finetune": shown(finetune_data),
            },
            evaluation=evaluation,
            sweep=Sweep(
                shown(calib_file) or "",
                primary_metric(task),
                searched.points,
                searched.recipe.to_dict(),
                "fixed" if space.mode == "fixed" else space.mode,
                searched.reason,
                _recipe(searched.points[searched.runner_up])
                if searched.runner_up is not None
                else None,
                {"points": space.budget, "seconds": space.seconds},
                searched.stopped_by,
                searched.skipped,
            )
            if calib_set is not None and (len(searched.points) > 1 or searching)
            else None,
            finetune=finetune_record,
            plans=diagnostics,
            artifacts=artifacts,
            seconds=timings,
            published=published_kind,
            otfuse_version=__version__,
        )
        document = metrics.to_dict()
        if extra_metrics is not None:
            document.update(extra_metrics(document))
        write_metrics(published, document)
        _append_card(published / "README.md", document)
        if report:
            from .report import write_report

            write_report(document, published / REPORT_FILE, fusion.transport_maps)
        say(Progress(1, 1, f"publishing {out}", stage="writing"))
        _check(cancelled)
        check_output_dir(out)
        published.chmod(0o755)  # mkdtemp made it private; a checkpoint folder is not
        if out.exists():
            out.rmdir()
        os.replace(published, out)
        files = {name: out / rel for name, rel in artifacts.items()}
        return JobResult(out, document, files, fusion)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _recipe(point) -> dict:
    from .search import recipe_of

    return recipe_of(point).to_dict()


def _metrics(folder: Path, eval_set: EvalSet, device: str, cancelled=None) -> dict[str, float]:
    scores = model_scores(folder, eval_set, device, should_cancel=cancelled)
    return metrics_from_scores(scores, eval_set.task)


def _check(cancelled: Callable[[], bool]) -> None:
    check_cancelled(cancelled, "fusion job")


def _resolved(path) -> str | None:
    return str(Path(path).resolve()) if path is not None else None


def _append_card(card: Path, document: dict) -> None:
    """The model card gets the evaluation table (eval data) and the sweep's choice."""
    lines = ["", "## Evaluation", ""]
    rows = [r for r in document["evaluation"]]
    if rows:
        names = sorted({k for r in rows for k in (r["metrics"] or {}) if k in METRIC_NAMES})
        lines += ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for r in rows:
            if r.get("skipped"):
                lines.append(f"| {r['name']} | skipped: {r['skipped']} |")
                continue
            cells = [_fmt(r["metrics"].get(n)) for n in names]
            mark = " (this model)" if r.get("path") == "." else ""
            lines.append(f"| {r['name']}{mark} | " + " | ".join(cells) + " |")
        lines.append(f"\nOn `{document['data']['eval']}`.")
    if document.get("sweep"):
        sweep = document["sweep"]
        lines.append(
            f"\nRecipe chosen on `{sweep['selected_on']}` by {sweep['metric']}: "
            f"{recipe_label(sweep['chosen'])} ({len(sweep['points'])} recipes tried; "
            f"{sweep.get('reason') or 'best calibration score'})."
        )
    lines.append("\nAll numbers: `metrics.json`.\n")
    with card.open("a") as handle:
        handle.write("\n".join(lines))


METRIC_NAMES = ("accuracy", "loss", "perplexity")


def recipe_label(recipe: dict) -> str:
    """A recipe dict for people: "anchor 1, activations, shared, matched heads, emd"."""
    solver = "emd" if recipe["solver"] == "emd" else f"sinkhorn reg={recipe['reg']:g}"
    return (
        f"anchor {recipe['anchor']}, {recipe['alignment']}, {recipe['residual']}, "
        f"{recipe['heads']} heads, {solver}"
    )


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))
