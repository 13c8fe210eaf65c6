"""`otfuse`: fuse transformer checkpoints with Optimal Transport from the shell.

Errors are one line on stderr and a non-zero exit; nothing is written at --out then.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from fusion_core.contract import DEFAULT_REG, Finetune, Policy
from fusion_core.errors import InputError
from fusion_core.spec import (
    ALIGNMENTS,
    HEAD_MODES,
    METHODS,
    QK_MODES,
    RECTANGULAR,
    RESIDUALS,
    SOLVERS,
    parse_size,
)

from .service_cli import HANDLERS as SERVICE_HANDLERS
from .service_cli import add_commands as add_service_commands

EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_FAILED = 1


def _float_or_fail(value: str) -> float:
    try:
        return float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from exc


def _size_or_fail(value: str) -> int:
    """Bytes from "5GB", "500MB", "2GiB" or a plain number (Hugging Face's notation)."""
    try:
        return parse_size(value)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _reg_or_fail(value: str) -> float | str:
    """A plain number stays a number; anything else is a sweep ("auto", "emd", a list),
    checked with the job spec."""
    try:
        return float(value)
    except ValueError:
        return value


POLICY = Policy()  # the job contract's defaults are the flags' defaults
FINETUNE = Finetune(steps=1)


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of a fusion recipe, shared by `fuse` and `plan`."""
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="ot",
        help="ot: align then average (default); vanilla: plain averaging",
    )
    parser.add_argument(
        "--alignment",
        choices=ALIGNMENTS,
        help="what the OT cost compares: weight rows (default) or activations on --data; "
        "given, it pins a search to it",
    )
    parser.add_argument(
        "--solver",
        choices=SOLVERS,
        help="emd: exact hard alignment; sinkhorn: soft alignment (default); given, it pins a "
        "search to it",
    )
    parser.add_argument(
        "--reg",
        type=_reg_or_fail,
        metavar="FLOAT|LIST|auto",
        help=f"Sinkhorn regularizer on the max-normalized cost (default {DEFAULT_REG:g}; smaller "
        "is harder). A comma-separated list (numbers and/or emd) or auto (EMD and Sinkhorn "
        "0.01..0.3, 5 log-spaced values) sweeps: one fusion per value, the best one-shot on "
        "--calib-data is kept; given, it pins a search's solver points",
    )
    parser.add_argument(
        "--residual",
        choices=RESIDUALS,
        help="how TMs merge at residual additions (default average; weighted "
        "policies use the anchor's activations on --data; shared: one TM for the whole "
        "residual stream, which keeps each aligned model's function under hard alignment); "
        "given, it pins a search to it",
    )
    parser.add_argument(
        "--filter",
        default=POLICY.filter,
        metavar="all|cls|window-N",
        help="ViT tokens used as activation samples (default all)",
    )
    parser.add_argument(
        "--qk",
        choices=QK_MODES,
        default=POLICY.qk,
        help="query and key share one TM (tied, default) or get their own; rotary models "
        "(Llama, Mistral, Qwen2) need tied: their Q/K heads move whole",
    )
    parser.add_argument(
        "--heads",
        choices=HEAD_MODES,
        help="matched (default): heads paired one to one (key/value groups first under "
        "grouped-query attention), dimensions aligned inside pairs; cross: the paper's "
        "cross-head alignment over all heads' dimensions (not for rotary models); given, it "
        "pins a search to it",
    )
    parser.add_argument(
        "--rectangular",
        choices=RECTANGULAR,
        default=POLICY.rectangular,
        help="maps between different widths: rms (default) keeps each anchor neuron's RMS "
        "and the attention temperature; mass: plain averages; width: the paper code's "
        "n_model/n_anchor on outputs",
    )
    parser.add_argument(
        "--anchor",
        type=int,
        metavar="INDEX",
        help="index of the model whose shapes and space the others join (default 0; a search "
        "tries every model when they have equal shapes, unless this is given)",
    )
    parser.add_argument(
        "--policy",
        metavar="auto|fixed|JSON",
        help="auto: search alignment x residual (average, shared, weighted-scalar) x heads x "
        "solver point (EMD, Sinkhorn 0.01..0.3) and the anchor, scored on --calib-data (never "
        "--eval-data), cheap recipes first; flags given pin their axis. fixed: the recipe the "
        "flags give. A JSON list of recipes (objects with alignment, residual, heads, solver, "
        "reg, anchor): those only. Default: auto with --calib-data, else fixed",
    )
    parser.add_argument(
        "--search-budget",
        type=int,
        default=POLICY.search_budget,
        metavar="N",
        help=f"most recipes a search fuses (default {POLICY.search_budget})",
    )
    parser.add_argument(
        "--search-seconds",
        type=_float_or_fail,
        default=POLICY.search_seconds,
        metavar="S",
        help=f"no new recipe is started after S seconds of search (default "
        f"{POLICY.search_seconds:g})",
    )
    parser.add_argument(
        "--weights",
        type=_float_or_fail,
        nargs="+",
        metavar="W",
        help="per-model weights in the average (default equal)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        metavar="FILE",
        help="safetensors of model inputs, for activations-based alignment and "
        "weighted residual policies",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=POLICY.samples,
        metavar="N",
        help=f"examples of --data used for activations (default {POLICY.samples})",
    )
    parser.add_argument(
        "--device",
        default=POLICY.device,
        metavar="auto|cpu|cuda[:N]",
        help="device for alignment, OT, evaluation and finetuning (default auto: cuda when "
        "there is one)",
    )
    parser.add_argument(
        "--allow-weights-only-pickle",
        action="store_true",
        help="also read legacy .bin checkpoints with torch's weights_only loader "
        "(off by default: safetensors only)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otfuse",
        description="Fuse independently trained transformers (same depth; widths may differ) "
        "into one model by aligning neurons and attention heads with Optimal Transport.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fuse = commands.add_parser(
        "fuse",
        help="fuse two or more HF checkpoint folders into one",
        description="Fuse two or more Hugging Face checkpoint folders (config.json + "
        "safetensors) of one family (BERT, RoBERTa/XLM-R, DistilBERT, ViT, GPT-2, Llama, "
        "Mistral, Qwen2) into --out, in the anchor's shapes.",
    )
    fuse.add_argument("models", nargs="+", metavar="MODEL_DIR", help="checkpoint folders (≥ 2)")
    fuse.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output folder (must not exist or be empty); written atomically",
    )
    add_recipe_flags(fuse)
    job = fuse.add_argument_group(
        "evaluate, sweep, finetune",
        "Any of these makes `fuse` a full job: --out then also holds metrics.json (and "
        "report.html, transport_maps.safetensors when asked); see docs/evaluation.md.",
    )
    job.add_argument(
        "--eval-data",
        type=Path,
        metavar="FILE",
        help="labelled inputs on which parents, their ensemble, vanilla fusion, the fused "
        "model (and finetuned models) are compared",
    )
    job.add_argument(
        "--calib-data",
        type=Path,
        metavar="FILE",
        help="held-out labelled inputs on which the recipe search (--policy auto, the "
        "default with this flag) or a --reg sweep picks the fusion (default: --data); must "
        "differ from --eval-data",
    )
    job.add_argument(
        "--finetune-data",
        type=Path,
        metavar="FILE",
        help="labelled inputs to finetune the fused model on (then --out holds the "
        "finetuned model)",
    )
    job.add_argument("--finetune-steps", type=int, metavar="N", help="finetune budget: steps")
    job.add_argument(
        "--finetune-epochs",
        type=_float_or_fail,
        metavar="E",
        help="finetune budget: epochs over --finetune-data (default 1 when no budget is given)",
    )
    job.add_argument(
        "--finetune-seconds",
        type=_float_or_fail,
        metavar="S",
        help="finetune budget: wall seconds (the first budget reached stops the finetune)",
    )
    job.add_argument(
        "--finetune-baselines",
        nargs="*",
        choices=("vanilla",),
        default=[],
        metavar="vanilla",
        help="also finetune vanilla fusion with the same budget, for comparison",
    )
    job.add_argument(
        "--lr",
        type=_float_or_fail,
        default=FINETUNE.lr,
        help=f"finetune peak learning rate ({FINETUNE.lr:g})",
    )
    job.add_argument(
        "--batch-size",
        type=int,
        default=FINETUNE.batch_size,
        help=f"finetune batch size ({FINETUNE.batch_size})",
    )
    job.add_argument(
        "--distill",
        type=_float_or_fail,
        default=FINETUNE.distill,
        metavar="ALPHA",
        help="finetune: weight of distillation from the parents' ensemble, in [0, 1] "
        f"(loss = (1 - ALPHA) CE + ALPHA T^2 KL; default {FINETUNE.distill:g}; 0 = plain "
        "finetuning)",
    )
    job.add_argument(
        "--temperature",
        type=_float_or_fail,
        default=FINETUNE.temperature,
        help=f"finetune: distillation temperature ({FINETUNE.temperature:g})",
    )
    fuse.add_argument(
        "--max-shard-size",
        type=_size_or_fail,
        metavar="SIZE",
        help="largest file of the fused checkpoint (5GB, 500MB, 2GiB or bytes; default 5GB, "
        "at least 1MiB): Hugging Face shards and their index, one model.safetensors when the "
        "model fits",
    )
    job.add_argument(
        "--save-transport-maps",
        action="store_true",
        help="write the per-layer plans to --out/transport_maps.safetensors",
    )
    job.add_argument(
        "--report",
        action="store_true",
        help="write --out/report.html (plots inlined: baselines, metric vs regularizer, "
        "finetune curves, transport-map heatmaps)",
    )
    fuse.add_argument("--quiet", action="store_true", help="no progress on stderr")

    planner = commands.add_parser(
        "plan",
        help="what fusing these models will be and cost, without fusing",
        description="From config.json and the safetensors headers only (no tensor is read): "
        "whether the models can be fused, the fused shapes, the transport-map graph (which "
        "spaces exist and which share a map), and the estimated peak memory and time on the "
        "chosen device (docs/fusion.md, fusion_core/plan_costs.py). Exit status 3 when the "
        "models cannot be fused.",
    )
    planner.add_argument("models", nargs="+", metavar="MODEL_DIR", help="checkpoint folders (≥ 2)")
    add_recipe_flags(planner)
    planner.add_argument(
        "--calib-data",
        type=Path,
        metavar="FILE",
        help="the calibration data of a sweep or search (the plan counts its fusions)",
    )
    planner.add_argument(
        "--eval-data", type=Path, metavar="FILE", help="as for fuse (checked, not read)"
    )
    planner.add_argument("--json", action="store_true", help="the plan as JSON on stdout")
    planner.set_defaults(
        out=None,
        finetune_data=None,
        finetune_steps=None,
        finetune_epochs=None,
        finetune_seconds=None,
        finetune_baselines=[],
        lr=FINETUNE.lr,
        batch_size=FINETUNE.batch_size,
        save_transport_maps=False,
        report=False,
    )

    evaluate = commands.add_parser(
        "eval",
        help="one-shot metrics of a checkpoint on a data file (JSON on stdout)",
        description="Evaluate a checkpoint folder on a safetensors data file: accuracy and "
        "loss for classifiers, loss and perplexity for masked and causal language models.",
    )
    evaluate.add_argument("model", metavar="MODEL_DIR")
    evaluate.add_argument("--data", type=Path, required=True, metavar="FILE")
    evaluate.add_argument("--device", default="cpu", metavar="cpu|cuda")

    demo = commands.add_parser(
        "demo",
        help="train two small ViTs on digits, fuse them, print one-shot metrics",
        description="The main job end to end with nothing to download: trains two ViT parents "
        "on scikit-learn's digits (cached in --workdir), fuses them with `otfuse fuse` and "
        "evaluates parents, vanilla and OT fusion with `otfuse eval`.",
    )
    demo.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    demo.add_argument("--epochs", type=int, default=40, help="parent training epochs")
    add_service_commands(commands)  # serve, worker, submit, status
    return parser


def _progress_printer(quiet: bool):
    """Progress lines on stderr, from the events' typed fields (the detail says the rest)."""
    started = time.perf_counter()
    last_stage = [""]

    def show(event) -> None:
        if quiet:
            return
        elapsed = time.perf_counter() - started
        if event.stage != last_stage[0]:
            last_stage[0] = event.stage
            print(f"[{elapsed:6.1f}s] -- {event.stage}", file=sys.stderr, flush=True)
        print(f"[{elapsed:6.1f}s] {event.detail}", file=sys.stderr, flush=True)

    return show


# The job spec's JSON fields -> this command's flags, to name the flag at fault.
FLAGS = {
    "models": "MODEL_DIR",
    "anchor": "--anchor",
    "method": "--method",
    "policy": "--policy",
    "policy.search": "--policy",
    "policy.search_budget": "--search-budget",
    "policy.search_seconds": "--search-seconds",
    "policy.alignment": "--alignment",
    "policy.solver": "--solver",
    "policy.residual": "--residual",
    "policy.filter": "--filter",
    "policy.qk": "--qk",
    "policy.heads": "--heads",
    "policy.rectangular": "--rectangular",
    "policy.samples": "--samples",
    "policy.device": "--device",
    "regularizer": "--reg",
    "weights": "--weights",
    "data.activations": "--data",
    "data.calibration": "--calib-data",
    "data.eval": "--eval-data",
    "data.finetune": "--finetune-data",
    "finetune": "--finetune-steps/--finetune-epochs/--finetune-seconds",
    "finetune.steps": "--finetune-steps",
    "finetune.epochs": "--finetune-epochs",
    "finetune.seconds": "--finetune-seconds",
    "finetune.lr": "--lr",
    "finetune.batch_size": "--batch-size",
    "finetune.distill": "--distill",
    "finetune.temperature": "--temperature",
    "finetune.baselines": "--finetune-baselines",
    "artifacts.transport_maps": "--save-transport-maps",
    "artifacts.report": "--report",
    "artifacts.max_shard_size": "--max-shard-size",
    "output": "--out",
}


def flag_of(field: str) -> str:
    """The flag for a JSON field ("regularizer.2" is --reg's third value)."""
    base = field.rsplit(".", 1)[0] if field.rsplit(".", 1)[-1].isdigit() else field
    return FLAGS.get(field) or FLAGS.get(base) or field


def job_spec(args: argparse.Namespace):
    """The job these flags ask for, as the contract's JobSpec (the API's and the worker's
    rules apply to it unchanged)."""
    from fusion_core.contract import parse_job

    def path(value) -> str | None:
        return str(Path(value).resolve()) if value is not None else None

    regularizer = args.reg
    if isinstance(regularizer, str) and regularizer.strip().lower() not in ("auto", "emd"):
        regularizer = [_number_or_word(item) for item in regularizer.split(",") if item.strip()]
    budget = (args.finetune_steps, args.finetune_epochs, args.finetune_seconds)
    finetune = None
    wanted = args.finetune_data is not None or args.finetune_baselines
    if wanted or any(v is not None for v in budget):
        finetune = {
            "steps": args.finetune_steps,
            "epochs": args.finetune_epochs,
            "seconds": args.finetune_seconds,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "distill": args.distill,
            "temperature": args.temperature,
            "baselines": args.finetune_baselines,
        }
        if all(v is None for v in budget) and args.finetune_data is not None:
            finetune["epochs"] = 1.0  # the documented default budget
    policy = {
        "filter": args.filter,
        "qk": args.qk,
        "rectangular": args.rectangular,
        "samples": args.samples,
        "device": args.device,
        "search_budget": args.search_budget,
        "search_seconds": args.search_seconds,
    }
    # only the flags given: a search keeps them (pinned) and searches the others
    given = {"alignment": args.alignment, "solver": args.solver, "residual": args.residual}
    policy.update({k: v for k, v in {**given, "heads": args.heads}.items() if v is not None})
    if args.policy is not None:
        policy["search"] = _policy_value(args.policy)
    document = {
        "models": [str(m) for m in args.models],
        "method": args.method,
        "policy": policy,
        "weights": args.weights,
        "data": {
            "activations": path(args.data),
            "calibration": path(args.calib_data),
            "eval": path(args.eval_data),
            "finetune": path(args.finetune_data),
        },
        "finetune": finetune,
        "artifacts": {"transport_maps": args.save_transport_maps, "report": args.report},
        "output": str(args.out) if args.out is not None else None,
    }
    if getattr(args, "max_shard_size", None) is not None:
        document["artifacts"]["max_shard_size"] = args.max_shard_size
    if args.anchor is not None:
        document["anchor"] = args.anchor
    if regularizer is not None:
        document["regularizer"] = regularizer
    return parse_job(document)


def _policy_value(text: str):
    """auto, fixed, or a JSON list of recipes (refused by the contract when it is not)."""
    if text.strip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"not a JSON list of recipes: {exc}", "policy.search") from None
    return text.strip().lower()


HUB = {"offline": False}


def local_models(models: list[str]) -> tuple[list[str], dict[str, str]]:
    """hf:// models as their local snapshot folders (fetched through the hub's cache: only the
    files a fusion reads), and the URI each folder came from, for the artifacts."""
    from adapters.hub import HubBackend

    folders, names = [], {}
    for model in models:
        if model.startswith("hf://"):
            folder = str(HubBackend(offline=HUB["offline"]).resolve(model))
            names[folder] = model
            model = folder
        folders.append(model)
    return folders, names


def _number_or_word(item: str) -> float | str:
    try:
        return float(item)
    except ValueError:
        return item.strip().lower()


def _device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _fuse(args: argparse.Namespace) -> int:
    import transformers

    from adapters.storage import StorageError
    from fusion_core import fuse
    from fusion_core.contract import (
        finetune_config,
        fusion_spec,
        reg_points,
        regs_argument,
        search_space,
        validate_job,
    )
    from fusion_core.job import fuse_job

    transformers.utils.logging.disable_progress_bar()
    spec = validate_job(job_spec(args))
    device = _device(spec.policy.device)
    recipe = fusion_spec(spec, device)
    show = _progress_printer(args.quiet)
    data = spec.data
    try:
        models, names = local_models(spec.models)
    except (StorageError, ValueError) as exc:
        raise InputError(str(exc), "models") from None
    warning = None if args.quiet else _memory_warning(models, recipe)
    if warning:
        print(warning, file=sys.stderr)
    search = search_space(spec)
    plain = (
        search.mode == "fixed"
        and len(reg_points(spec)) == 1
        and data.eval is None
        and data.calibration is None
        and spec.finetune is None
        and not (spec.artifacts.report or spec.artifacts.transport_maps)
    )
    if plain:  # one fusion, no job around it
        report = fuse(
            models,
            args.out,
            recipe,
            data=data.activations,
            progress=show,
            allow_pickle=args.allow_weights_only_pickle,
            names=names,
            search={"mode": "fixed", "why": search.reason},
        )
        if not args.quiet:
            print(
                f"fused {len(report.models)} models into {report.out} in {report.seconds:.1f}s",
                file=sys.stderr,
            )
        return 0
    result = fuse_job(
        models,
        args.out,
        recipe,
        regs=regs_argument(spec),
        search=search,
        data=data.activations,
        eval_data=data.eval,
        calib_data=data.calibration,
        finetune_config=finetune_config(spec, device),
        finetune_data=data.finetune,
        finetune_baselines=spec.finetune.baselines if spec.finetune else (),
        save_maps=spec.artifacts.transport_maps,
        report=spec.artifacts.report,
        progress=show,
        allow_pickle=args.allow_weights_only_pickle,
        names=names,
    )
    if not args.quiet:
        print(_summary(result.metrics), file=sys.stderr)
        print(f"wrote {result.out} ({', '.join(sorted(result.artifacts))})", file=sys.stderr)
    return 0


def _summary(metrics: dict) -> str:
    """The evaluation table, as the model card shows it, for stderr."""
    lines = []
    sweep = metrics.get("sweep")
    if sweep:
        from fusion_core.job import recipe_label

        lines.append(
            f"chosen on calibration data by {sweep['metric']} ({len(sweep['points'])} recipes "
            f"tried): {recipe_label(sweep['chosen'])}"
        )
    for row in metrics.get("evaluation", []):
        if row.get("skipped"):
            lines.append(f"  {row['name']:<18} skipped ({row['skipped']})")
        else:
            values = ", ".join(
                f"{k} {v:.4f}" for k, v in row["metrics"].items() if isinstance(v, float)
            )
            lines.append(f"  {row['name']:<18} {values}")
    return "\n".join(lines)


def _plan(args: argparse.Namespace) -> int:
    from fusion_core.contract import fusion_spec, search_space, validate_job
    from fusion_core.plan import local_plan, plan_device

    spec = validate_job(job_spec(args))
    if any(m.startswith("hf://") for m in spec.models):
        raise InputError("plan reads local folders; fetch hf:// models first", "models")
    recipe = fusion_spec(spec, plan_device(spec.policy.device))
    fusions = search_space(spec).planned(len(spec.models))
    report = local_plan(spec.models, recipe, spec.data.activations, fusions=fusions)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
    return 0 if report.compatible else EXIT_INPUT


def _memory_warning(models: list[str], recipe) -> str | None:
    """A warning when the plan's peak memory is above what this machine has free (a plan
    that cannot be made is the fusion's to report)."""
    from fusion_core.plan import available_memory, local_plan

    try:
        report = local_plan(models, recipe, None)
    except Exception:
        return None
    free = available_memory()
    est = report.estimate
    if est is None or free is None or est.host_peak_bytes <= free:
        return None
    return (
        f"otfuse: warning: this fusion needs ~{est.host_peak_bytes / 2**30:.1f} GiB of memory "
        f"(otfuse plan), {free / 2**30:.1f} GiB are available"
    )


def _eval(args: argparse.Namespace) -> int:
    import transformers

    from fusion_core import evaluate

    transformers.utils.logging.disable_progress_bar()
    print(json.dumps(evaluate(args.model, args.data, device=args.device), indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.workdir, epochs=args.epochs)
    return 0


def main(argv: list[str] | None = None) -> int:
    # hf:// models follow the user's HF_HUB_OFFLINE; transformers itself only reads the local
    # folders it is given, never a hub
    HUB["offline"] = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    handlers = {"fuse": _fuse, "plan": _plan, "eval": _eval, "demo": _demo, **SERVICE_HANDLERS}
    from fusion_core import FusionError, InputError

    try:
        return handlers[args.command](args)
    except InputError as exc:
        from fusion_core.contract import as_job_error

        exc = as_job_error(exc)
        where = f"{flag_of(exc.field)}: " if exc.field else ""
        print(f"otfuse: error: {where}{exc.reason}", file=sys.stderr)
        return EXIT_INPUT
    except FusionError as exc:
        print(f"otfuse: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("otfuse: interrupted; nothing was written", file=sys.stderr)
        return 130
