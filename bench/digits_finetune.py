"""The paper's Tables 1, 2 and 4 at digits scale: one-shot and finetuned fused ViTs.

    python bench/digits_finetune.py [--workdir runs/bench-digits] [--steps 200] [--lr 2e-3]
                                    [--curve 50,100,200,400]

Parents are the ViTs of bench/digits_table.py (hidden 64, 3 layers, 4 heads, seeds 0-4, and
a narrow hidden-48 one from seed 5), trained once and cached in --workdir. Each table is one
`fusion_core.fuse_job`: activations-based OT with one shared residual-stream map, the
regularizer swept ("auto": EMD and Sinkhorn 0.01..0.3) and chosen on the calibration split
(180 images), every model scored on the test split (360 images), then a short finetune of
the chosen fusion and of vanilla fusion with the same budget on the training split (1,257
images). A control row finetunes the best parent (or the anchor) with that budget too, so
that the gain of fusion is not mistaken for the gain of more training; budget curves repeat
the three finetunes at 50 to 400 steps (parents trained 800 steps). Prints markdown
tables; everything goes to --workdir/finetune-results.json and one report.html per table
(--workdir/ft-<table>/report.html). Results are recorded in docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import transformers

from fusion_core import FinetuneConfig, FusionSpec, evaluate, finetune, fuse_job
from fusion_core.api import prepare
from fusion_core.baselines import vanilla_fusion
from otfuse.digits import load_digits_splits, save_model, save_split, train_vit

transformers.utils.logging.disable_progress_bar()
RECIPE = FusionSpec(alignment="activations", residual="shared", heads="matched", samples=180)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parents(workdir: Path, epochs: int) -> dict[str, Path]:
    splits = load_digits_splits()
    for name, split in (("test", splits.test), ("calib", splits.calib), ("train", splits.train)):
        if not (workdir / f"{name}.safetensors").is_file():
            save_split(split, workdir / f"{name}.safetensors")
    recipes = {f"seed{s}": (s, 64) for s in range(5)} | {"narrow": (5, 48)}
    folders = {}
    for name, (seed, hidden) in recipes.items():
        folder = workdir / name
        if not (folder / "model.safetensors").is_file():
            log(f"training {name} ({epochs} epochs)")
            save_model(train_vit(seed, splits, epochs=epochs, hidden=hidden), folder)
        folders[name] = folder
    return folders


def table(workdir: Path, key: str, models: list[Path], config: FinetuneConfig) -> dict:
    out = workdir / f"ft-{key}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = fuse_job(
        models,
        out,
        RECIPE,
        regs="auto",
        data=workdir / "calib.safetensors",
        eval_data=workdir / "test.safetensors",
        calib_data=workdir / "calib.safetensors",
        finetune_config=config,
        finetune_data=workdir / "train.safetensors",
        finetune_baselines=["vanilla"],
        report=True,
        stage=lambda s: log(f"{key}: {s}"),
    )
    seconds = time.perf_counter() - started
    rows = result.metrics["evaluation"]
    parents_acc = [r["metrics"]["accuracy"] for r in rows if r["kind"] == "parent"]
    # control: the best parent (the anchor for heterogeneous fusion) with the same finetune
    control_index = 0 if key.startswith("hetero") else parents_acc.index(max(parents_acc))
    control_out = workdir / f"ft-{key}-control"
    shutil.rmtree(control_out, ignore_errors=True)
    finetune(models[control_index], workdir / "train.safetensors", control_out, config)
    control = evaluate(control_out, workdir / "test.safetensors")
    shutil.rmtree(control_out, ignore_errors=True)
    return {
        "models": [str(m) for m in models],
        "rows": rows,
        "sweep": result.metrics["sweep"],
        "finetune": result.metrics["finetune"],
        "control": {"parent": control_index, **control},
        "seconds": round(seconds, 1),
    }


def curve(workdir: Path, key: str, models: list[Path], budgets: list[int], lr: float) -> list:
    """Test accuracy and loss after finetunes of growing budgets: the chosen one-shot fusion,
    vanilla fusion and the control parent, each from the same start for every budget."""
    out = workdir / f"ft-{key}-oneshot"
    shutil.rmtree(out, ignore_errors=True)
    job = fuse_job(
        models,
        out,
        RECIPE,
        regs="auto",
        data=workdir / "calib.safetensors",
        eval_data=workdir / "test.safetensors",
        calib_data=workdir / "calib.safetensors",
    )
    rows = job.metrics["evaluation"]
    parents_acc = [r["metrics"]["accuracy"] for r in rows if r["kind"] == "parent"]
    control = 0 if key.startswith("hetero") else parents_acc.index(max(parents_acc))
    starts = {"fused": out, "control": models[control]}
    vanilla = workdir / f"ft-{key}-vanilla"
    shutil.rmtree(vanilla, ignore_errors=True)
    if vanilla_fusion(prepare(models, RECIPE, workdir / "calib.safetensors"), vanilla) is None:
        starts["vanilla"] = vanilla
    points = []
    for steps in budgets:
        point = {"steps": steps}
        for name, start in starts.items():
            target = workdir / f"ft-{key}-{name}-{steps}"
            shutil.rmtree(target, ignore_errors=True)
            config = FinetuneConfig(steps=steps, lr=lr, batch_size=64, distill=0.0)
            finetune(start, workdir / "train.safetensors", target, config)
            point[name] = evaluate(target, workdir / "test.safetensors")
            shutil.rmtree(target, ignore_errors=True)
        log(f"{key}: curve at {steps} steps done")
        points.append(point)
    shutil.rmtree(vanilla, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return points


def show_curve(title: str, points: list) -> None:
    names = [n for n in ("fused", "vanilla", "control") if n in points[0]]
    heads = {"fused": "OT + finetune", "vanilla": "vanilla + finetune", "control": "control"}
    print(f"\n#### {title}: test accuracy (loss) against the finetune budget\n")
    print("| steps (batch 64) | " + " | ".join(heads[n] for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for p in points:
        cells = [f"{p[n]['accuracy']:.3f} ({p[n]['loss']:.3f})" for n in names]
        print(f"| {p['steps']} | " + " | ".join(cells) + " |")


def show(title: str, result: dict) -> None:
    sweep = result["sweep"]
    chosen = sweep["chosen"]
    reg = "EMD" if chosen["solver"] == "emd" else f"Sinkhorn {chosen['reg']:g}"
    print(f"\n### {title}\n")
    print("| model | test accuracy | test loss |")
    print("|---|---|---|")
    for row in result["rows"]:
        if row.get("skipped"):
            print(f"| {row['name']} | skipped (widths differ) | |")
            continue
        m = row["metrics"]
        name = row["name"] + (
            f" (one-shot, {reg} chosen on calib)" if row["kind"] == "fused" else ""
        )
        print(f"| {name} | {m['accuracy']:.3f} | {m['loss']:.3f} |")
    c = result["control"]
    print(
        f"| parent {c['parent']} + same finetune (control) "
        f"| {c['accuracy']:.3f} | {c['loss']:.3f} |"
    )
    points = ", ".join(
        f"{'EMD' if p['solver'] == 'emd' else format(p['reg'], 'g')}: {p['calib']['accuracy']:.3f}"
        for p in sweep["points"]
    )
    print(f"\nSweep (calibration accuracy): {points}. Job wall time {result['seconds']} s.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-digits"))
    parser.add_argument("--epochs", type=int, default=40, help="parent training epochs")
    parser.add_argument("--steps", type=int, default=200, help="finetune steps (batch 64)")
    parser.add_argument("--lr", type=float, default=2e-3, help="finetune peak learning rate")
    parser.add_argument(
        "--curve",
        default="50,100,200,400",
        help="finetune budgets (steps) for the budget curves; empty: no curves",
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    folders = parents(args.workdir, args.epochs)
    # plain finetuning, as documented (bench/healing.py compares it with distillation)
    config = FinetuneConfig(steps=args.steps, lr=args.lr, batch_size=64, distill=0.0)
    seeds = [folders[f"seed{s}"] for s in range(5)]
    tables = {
        "2": ("2 models (anchor seed 0)", seeds[:2]),
        "5": ("5 models (anchor seed 0)", seeds),
        "hetero": ("heterogeneous: anchor hidden 48 <- hidden 64", [folders["narrow"], seeds[0]]),
    }
    results = {"finetune": config.to_dict(), "recipe": RECIPE.to_dict()}
    for key, (title, models) in tables.items():
        log(f"table {title}")
        results[key] = table(args.workdir, key, models, config)
        show(title, results[key])
        budgets = [int(b) for b in args.curve.split(",") if b.strip()]
        if budgets:
            results[key]["curve"] = curve(args.workdir, key, models, budgets, args.lr)
            show_curve(title, results[key]["curve"])
    (args.workdir / "finetune-results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
