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
        "safetensors) of one family (BERT, ViT) into --out, in the anchor's shapes.",
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
        type=_float_or_fail,
        default=0.05,
        help="Sinkhorn regularizer on the max-normalized cost (default 0.05; smaller is harder)",
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
        help="query and key share one TM (tied, default) or get their own",
    )
    fuse.add_argument(
        "--heads",
        choices=("matched", "cross"),
        default="matched",
        help="matched (default): heads paired one to one, dimensions aligned inside pairs; "
        "cross: the paper's cross-head alignment over all heads' dimensions",
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
    fuse.add_argument("--quiet", action="store_true", help="no progress on stderr")

    evaluate = commands.add_parser(
        "eval",
        help="one-shot metrics of a checkpoint on a data file (JSON on stdout)",
        description="Evaluate a checkpoint folder on a safetensors data file: accuracy and "
        "loss for classifiers, loss and perplexity for masked language models.",
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

    spec = FusionSpec(
        method=args.method,
        alignment=args.alignment,
        solver=args.solver,
        reg=args.reg,
        residual=args.residual,
        filter=args.filter,
        qk=args.qk,
        heads=args.heads,
        anchor=args.anchor,
        weights=tuple(args.weights) if args.weights else None,
        samples=args.samples,
        device=args.device,
    )
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


def _eval(args: argparse.Namespace) -> int:
    from fusion_core import evaluate

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
