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


def _reg_or_fail(value: str) -> float | str:
    """A plain number stays a number (validated with the spec); anything else is a sweep."""
    try:
        return float(value)
    except ValueError:
        pass
    from fusion_core import InputError
    from fusion_core.sweep import parse_regs

    try:
        parse_regs(value)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return value


JOB_FLAGS = (
    "eval_data",
    "calib_data",
    "finetune_data",
    "finetune_steps",
    "finetune_epochs",
    "finetune_seconds",
    "save_transport_maps",
    "report",
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
    fuse.add_argument(
        "--method",
        choices=("ot", "vanilla"),
        default="ot",
        help="ot: align then average (default); vanilla: plain averaging",
    )
    fuse.add_argument(
        "--alignment",
        choices=("weights", "activations"),
        default="weights",
        help="what the OT cost compares: weight rows (default) or activations on --data",
    )
    fuse.add_argument(
        "--solver",
        choices=("emd", "sinkhorn"),
        default="sinkhorn",
        help="emd: exact hard alignment; sinkhorn: soft alignment (default)",
    )
    fuse.add_argument(
        "--reg",
        type=_reg_or_fail,
        default=0.05,
        metavar="FLOAT|LIST|auto",
        help="Sinkhorn regularizer on the max-normalized cost (default 0.05; smaller is "
        "harder). A comma-separated list (numbers and/or emd) or auto (EMD and Sinkhorn "
        "0.01..0.3, 5 log-spaced values) sweeps: one fusion per value, the best one-shot on "
        "--calib-data is kept",
    )
    fuse.add_argument(
        "--residual",
        default="average",
        choices=("average", "weighted-scalar", "weighted-matrix", "identity", "shared"),
        help="how TMs merge at residual additions (default average; weighted "
        "policies use the anchor's activations on --data; shared: one TM for the whole "
        "residual stream, which keeps each aligned model's function under hard alignment)",
    )
    fuse.add_argument(
        "--filter",
        default="all",
        metavar="all|cls|window-N",
        help="ViT tokens used as activation samples (default all)",
    )
    fuse.add_argument(
        "--qk",
        choices=("tied", "free"),
        default="tied",
        help="query and key share one TM (tied, default) or get their own; rotary models "
        "(Llama, Mistral, Qwen2) need tied: their Q/K heads move whole",
    )
    fuse.add_argument(
        "--heads",
        choices=("matched", "cross"),
        default="matched",
        help="matched (default): heads paired one to one (key/value groups first under "
        "grouped-query attention), dimensions aligned inside pairs; cross: the paper's "
        "cross-head alignment over all heads' dimensions (not for rotary models)",
    )
    fuse.add_argument(
        "--anchor",
        type=int,
        default=0,
        metavar="INDEX",
        help="index of the model whose shapes and space the others join (default 0)",
    )
    fuse.add_argument(
        "--weights",
        type=_float_or_fail,
        nargs="+",
        metavar="W",
        help="per-model weights in the average (default equal)",
    )
    fuse.add_argument(
        "--data",
        type=Path,
        metavar="FILE",
        help="safetensors of model inputs, for activations-based alignment and "
        "weighted residual policies",
    )
    fuse.add_argument(
        "--samples",
        type=int,
        default=200,
        metavar="N",
        help="examples of --data used for activations (default 200)",
    )
    fuse.add_argument(
        "--device",
        default="cpu",
        metavar="cpu|cuda",
        help="device for alignment and OT (default cpu)",
    )
    fuse.add_argument(
        "--allow-weights-only-pickle",
        action="store_true",
        help="also read legacy .bin checkpoints with torch's weights_only loader "
        "(off by default: safetensors only)",
    )
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
        help="held-out labelled inputs on which a --reg sweep picks its value (default: "
        "--data); must differ from --eval-data",
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
        "--lr", type=_float_or_fail, default=1e-4, help="finetune peak learning rate (1e-4)"
    )
    job.add_argument("--batch-size", type=int, default=32, help="finetune batch size (32)")
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
    started = time.perf_counter()

    def show(progress) -> None:
        if not quiet:
            elapsed = time.perf_counter() - started
            print(f"[{elapsed:6.1f}s] {progress.detail}", file=sys.stderr, flush=True)

    return show


def _fuse(args: argparse.Namespace) -> int:
    from fusion_core import FusionSpec, fuse

    sweep = isinstance(args.reg, str)
    spec = FusionSpec(
        method=args.method,
        alignment=args.alignment,
        solver=args.solver,
        reg=0.05 if sweep else args.reg,
        residual=args.residual,
        filter=args.filter,
        qk=args.qk,
        heads=args.heads,
        anchor=args.anchor,
        weights=tuple(args.weights) if args.weights else None,
        samples=args.samples,
        device=args.device,
    )
    if (
        sweep
        or args.finetune_baselines
        or any(getattr(args, f) not in (None, False) for f in JOB_FLAGS)
    ):
        return _fuse_job(args, spec)
    report = fuse(
        args.models,
        args.out,
        spec,
        data=args.data,
        progress=_progress_printer(args.quiet),
        allow_pickle=args.allow_weights_only_pickle,
    )
    if not args.quiet:
        print(
            f"fused {len(report.models)} models into {report.out} in {report.seconds:.1f}s",
            file=sys.stderr,
        )
    return 0


def _fuse_job(args: argparse.Namespace, spec) -> int:
    import transformers

    from fusion_core import InputError
    from fusion_core.finetune import FinetuneConfig
    from fusion_core.job import fuse_job

    transformers.utils.logging.disable_progress_bar()
    if args.method != "ot":
        raise InputError("evaluation, sweep and finetune flags need --method ot")
    budget = (args.finetune_steps, args.finetune_epochs, args.finetune_seconds)
    finetune = None
    if args.finetune_data is not None or any(v is not None for v in budget):
        finetune = FinetuneConfig(
            steps=args.finetune_steps,
            epochs=args.finetune_epochs,
            seconds=args.finetune_seconds,
            lr=args.lr,
            batch_size=args.batch_size,
            device=args.device,
        )
    show = _progress_printer(args.quiet)
    result = fuse_job(
        args.models,
        args.out,
        spec,
        regs=args.reg if isinstance(args.reg, str) else None,
        data=args.data,
        eval_data=args.eval_data,
        calib_data=args.calib_data,
        finetune_config=finetune,
        finetune_data=args.finetune_data,
        finetune_baselines=args.finetune_baselines,
        save_maps=args.save_transport_maps,
        report=args.report,
        progress=show,
        stage=lambda name: show(_Stage(name)),
        allow_pickle=args.allow_weights_only_pickle,
    )
    if not args.quiet:
        print(_summary(result.metrics), file=sys.stderr)
        print(f"wrote {result.out} ({', '.join(sorted(result.artifacts))})", file=sys.stderr)
    return 0


class _Stage:
    def __init__(self, name: str) -> None:
        self.detail = f"stage: {name}"


def _summary(metrics: dict) -> str:
    """The evaluation table, as the model card shows it, for stderr."""
    lines = []
    sweep = metrics.get("sweep")
    if sweep:
        chosen = sweep["chosen"]
        what = "emd" if chosen["solver"] == "emd" else f"sinkhorn reg={chosen['reg']:g}"
        lines.append(f"chosen on calibration data by {sweep['metric']}: {what}")
    for row in metrics.get("evaluation", []):
        if row.get("skipped"):
            lines.append(f"  {row['name']:<18} skipped ({row['skipped']})")
        else:
            values = ", ".join(
                f"{k} {v:.4f}" for k, v in row["metrics"].items() if isinstance(v, float)
            )
            lines.append(f"  {row['name']:<18} {values}")
    return "\n".join(lines)


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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # checkpoints are local folders, never a hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    handlers = {"fuse": _fuse, "eval": _eval, "demo": _demo, **SERVICE_HANDLERS}
    from fusion_core import FusionError, InputError

    try:
        return handlers[args.command](args)
    except InputError as exc:
        print(f"otfuse: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except FusionError as exc:
        print(f"otfuse: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("otfuse: interrupted; nothing was written", file=sys.stderr)
        return 130
