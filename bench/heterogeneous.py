"""Heterogeneous fusion on digits: the conventions for rectangular maps, over several pairs.

    python bench/heterogeneous.py [--workdir runs/bench-digits] [--wide 0,1,2]
                                  [--conventions rms,mass,width]

The narrow ViT (hidden 48, seed 5) and wide ones (hidden 64, seeds --wide), as in
bench/digits_table.py (trained once and cached in --workdir). For each pair, both
directions (48 <- 64: the narrow model is the anchor; 64 <- 48) and each `--rectangular`
convention, the recipes below are fused at each regularizer; the best point on the
calibration split is scored on the test split. Prints mean ± std over pairs and the
per-pair numbers; results accumulate in --workdir/heterogeneous-results.json (finished
points are not redone). With --control the partners are untrained ViTs of the other width
(is the partner contributing?), results in --workdir/heterogeneous-control.json. Figures
are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import torch
import transformers

from fusion_core import FusionSpec, evaluate, fuse
from otfuse.digits import load_digits_splits, save_model, save_split, train_vit, vit_config

transformers.utils.logging.disable_progress_bar()
RECIPES = {
    "act-shared-sinkhorn": (
        {"alignment": "activations", "residual": "shared", "solver": "sinkhorn"},
        (0.1, 0.3),
    ),
    "paper-weights-emd": (
        {"alignment": "weights", "heads": "cross", "residual": "average", "solver": "emd"},
        (None,),
    ),
    "paper-weights-sinkhorn": (
        {"alignment": "weights", "heads": "cross", "residual": "average", "solver": "sinkhorn"},
        (0.03, 0.1, 0.3),
    ),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def model(workdir: Path, name: str, seed: int, hidden: int) -> Path:
    folder = workdir / name
    if not (folder / "model.safetensors").is_file():
        log(f"training {name}")
        save_model(train_vit(seed, load_digits_splits(), epochs=40, hidden=hidden), folder)
    return folder


def untrained_vit(workdir: Path, hidden: int) -> Path:
    folder = workdir / f"untrained{hidden}"
    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(100 + hidden)
        save_model(transformers.ViTForImageClassification(vit_config(hidden)), folder)
    return folder


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-digits"))
    parser.add_argument("--wide", default="0,1,2", help="seeds of the hidden-64 models")
    parser.add_argument("--conventions", default="rms,mass,width")
    parser.add_argument(
        "--recipes", default=",".join(list(RECIPES)[:2]), help="names, comma-separated"
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="pair the models with untrained ViTs of the other width instead (is the partner "
        "contributing?)",
    )
    args = parser.parse_args()
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    splits = load_digits_splits()
    for name, split in (("test", splits.test), ("calib", splits.calib)):
        if not (workdir / f"{name}.safetensors").is_file():
            save_split(split, workdir / f"{name}.safetensors")
    calib, test = workdir / "calib.safetensors", workdir / "test.safetensors"
    results_file = workdir / "heterogeneous-results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    narrow = model(workdir, "narrow", 5, 48)
    wides = [int(s) for s in args.wide.split(",")]
    if args.control:
        untrained = {hidden: untrained_vit(workdir, hidden) for hidden in (48, 64)}
        results_file = workdir / "heterogeneous-control.json"
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    conventions = args.conventions.split(",")
    recipes = [r for r in RECIPES if r in args.recipes.split(",")]
    table: dict[tuple[str, str], list[float]] = {}
    for seed in wides:
        wide = model(workdir, f"seed{seed}", seed, 64)
        pairs = (("48 <- 64", [narrow, wide]), ("64 <- 48", [wide, narrow]))
        if args.control:
            pairs = (("48 <- 64", [narrow, untrained[64]]), ("64 <- 48", [wide, untrained[48]]))
        for direction, pair in pairs:
            for convention in conventions:
                best = None
                for recipe in recipes:
                    flags, regs = RECIPES[recipe]
                    for reg in regs:
                        key = f"{direction}|seed{seed}|{convention}|{recipe}|{reg}"
                        if key not in results:
                            spec = FusionSpec(**flags, reg=reg or 0.05, rectangular=convention)
                            out = workdir / "hetero-fused"
                            shutil.rmtree(out, ignore_errors=True)
                            fuse(pair, out, spec, data=calib)
                            results[key] = {
                                "calib": evaluate(out, calib)["accuracy"],
                                "test": evaluate(out, test)["accuracy"],
                            }
                            results_file.write_text(json.dumps(results, indent=2) + "\n")
                            log(f"{key}: {results[key]}")
                        point = {**results[key], "recipe": recipe, "reg": reg}
                        if best is None or point["calib"] > best["calib"]:
                            best = point
                        cell = (direction, convention, recipe)
                        table.setdefault(cell, {})[seed] = max(
                            table.get(cell, {}).get(seed, (-1, 0)), (point["calib"], point["test"])
                        )
                table.setdefault((direction, convention, "best"), {})[seed] = (
                    best["calib"],
                    best["test"],
                )
    print("\n### One-shot test accuracy (best point on calib), mean ± std over pairs\n")
    print("| direction | convention | " + " | ".join([*recipes, "best of all"]) + " |")
    print("|---" * (len(recipes) + 3) + "|")
    for direction in ("48 <- 64", "64 <- 48"):
        for convention in conventions:
            cells = []
            for recipe in [*recipes, "best"]:
                per_seed = table.get((direction, convention, recipe), {})
                values = [per_seed[s][1] for s in wides if s in per_seed]
                cells.append(mean_std(values) if values else "—")
            print(f"| {direction} | {convention} | " + " | ".join(cells) + " |")
    print("\nPer pair (best of all, test):")
    for (direction, convention, recipe), per_seed in table.items():
        if recipe == "best":
            shown = ", ".join(f"seed{s}: {per_seed[s][1]:.3f}" for s in wides if s in per_seed)
            print(f"- {direction}, {convention}: {shown}")


if __name__ == "__main__":
    main()
