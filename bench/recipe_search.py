"""Does `--policy auto` find a good recipe? One-shot test accuracy of the recipe it chooses on
the calibration split, against the default recipe, the best row of the digits benchmark
table, and the best recipe of the whole grid (an oracle that peeks at the test split).

    python bench/recipe_search.py [--workdir runs/bench-digits] [--pairs 0-1 2-3 0-2]
                                  [--bert-workdir runs/bench-bert-digits] [--no-grid]

Parents: the digits ViTs of bench/digits_table.py (hidden 64, 3 layers, 4 heads, seeds 0-4,
cached in --workdir, trained when missing) and a BERT pair on digit sequences (each 8x8
image's 2x2 blocks read row by row as 16 tokens of 17 grey levels after a [CLS] token;
hidden 64, 3 layers, 4 heads; 20 epochs from seeds 0 and 1; cached in --bert-workdir).

- auto: `fuse_job` with `SearchSpace.auto` and the default budget (what `otfuse fuse
  --calib-data ...` runs), scored on the calibration split only; its published model is then
  evaluated on the test split.
- default: the fixed default recipe (anchor 0, weights, average, matched heads, Sinkhorn
  0.05): what a job without calibration data runs.
- table best: the best test accuracy among bench/digits_table.py's rows (the paper's recipe
  and otfuse's, weights or activations, EMD or the best Sinkhorn of 0.01/0.03/0.1/0.3 on
  calibration, anchor 0).
- grid best: every recipe of the search space (2 anchors x 2 alignments x 3 residuals x 2
  heads x 6 solver points = 144), fused in memory, the best on test (an oracle).

Prints one markdown table; results also go to --workdir/recipe_search-<pairs>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

from fusion_core import FusionSpec
from fusion_core.api import prepare
from fusion_core.contract import Recipe, SearchSpace
from fusion_core.evaluate import load_eval_set
from fusion_core.job import fuse_job
from fusion_core.search import run_search, score_recipe
from otfuse.digits import (
    load_digits_splits,
    save_model,
    save_split,
    train_classifier,
    train_vit,
)

transformers.utils.logging.disable_progress_bar()
TABLE_REGS = (0.01, 0.03, 0.1, 0.3)  # bench/digits_table.py's
TABLE_RECIPES = {"paper": ("cross", "average"), "otfuse": ("matched", "shared")}
CLS, LEVELS = 17, 17  # grey levels 0..16 are tokens 0..16


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- parents ------------------------------------------------------------------------------------
def vit_parents(workdir: Path, seeds: set[int], epochs: int = 40) -> dict[int, Path]:
    """bench/digits_table.py's parents (same recipe, same cache folders)."""
    workdir.mkdir(parents=True, exist_ok=True)
    splits = load_digits_splits()
    save_split(splits.test, workdir / "test.safetensors")
    save_split(splits.calib, workdir / "calib.safetensors")
    folders = {}
    for seed in sorted(seeds):
        folder = workdir / f"seed{seed}"
        if not (folder / "model.safetensors").is_file():
            log(f"training ViT seed {seed} ({epochs} epochs)")
            save_model(train_vit(seed, splits, epochs=epochs, hidden=64), folder)
        folders[seed] = folder
    return folders


def as_tokens(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 1, 8, 8) pixels in [-1, 1] -> (N, 17) ids: [CLS] then the 16 grey levels (0..16)
    of the image's 2x2 blocks, row by row (as many tokens as the ViT's patches)."""
    blocks = F.avg_pool2d(pixels, 2).reshape(len(pixels), 16)
    levels = ((blocks + 1.0) * 8.0).round().clamp(0, 16).long()
    return torch.cat([torch.full((len(pixels), 1), CLS), levels], dim=1)


def bert_config() -> transformers.BertConfig:
    config = transformers.BertConfig(
        vocab_size=LEVELS + 1,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=80,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    config.architectures = ["BertForSequenceClassification"]
    return config


def train_bert(seed: int, ids: torch.Tensor, labels: torch.Tensor, epochs: int):
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(bert_config())
    return train_classifier(model, "input_ids", ids, labels, epochs, seed)


def bert_parents(
    workdir: Path, epochs: int = 20, seeds: tuple[int, ...] = (0, 1)
) -> tuple[list[Path], Path, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    splits = load_digits_splits()
    files = {}
    for name, (pixels, labels) in (("calib", splits.calib), ("test", splits.test)):
        ids = as_tokens(pixels)
        files[name] = workdir / f"{name}.safetensors"
        save_file(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
            str(files[name]),
        )
    folders = []
    for seed in seeds:
        folder = workdir / f"bert-seed{seed}"
        if not (folder / "model.safetensors").is_file():
            log(f"training BERT seed {seed} on digit sequences ({epochs} epochs)")
            ids = as_tokens(splits.train[0])
            save_model(train_bert(seed, ids, splits.train[1], epochs), folder)
        folders.append(folder)
    return folders, files["calib"], files["test"]


# -- measurements -------------------------------------------------------------------------------
def job_accuracy(models, calib, test, search: SearchSpace | None, spec: FusionSpec) -> dict:
    """A real job: search (or the fixed recipe) on calib, the published model on test."""
    with tempfile.TemporaryDirectory(dir=Path(calib).parent) as folder:
        started = time.perf_counter()
        result = fuse_job(
            models, Path(folder) / "out", spec, search=search, calib_data=calib, eval_data=test
        )
        seconds = time.perf_counter() - started
    metrics = result.metrics
    fused = next(r for r in metrics["evaluation"] if r["kind"] == "fused")["metrics"]
    vanilla = next(r for r in metrics["evaluation"] if r["kind"] == "vanilla")["metrics"]
    parents = [r["metrics"]["accuracy"] for r in metrics["evaluation"] if r["kind"] == "parent"]
    sweep = metrics.get("sweep") or {}
    return {
        "test": fused["accuracy"],
        "vanilla": vanilla.get("accuracy"),
        "parents": parents,
        "recipe": sweep.get("chosen") or _spec_recipe(metrics["spec"]),
        "points": len(sweep.get("points") or [1]),
        "seconds": round(seconds, 1),
    }


def _spec_recipe(spec: dict) -> dict:
    keys = ("anchor", "alignment", "residual", "heads", "solver", "reg")
    recipe = {k: spec[k] for k in keys}
    if recipe["solver"] == "emd":
        recipe["reg"] = None
    return recipe


def scored(models, calib, test, space: SearchSpace) -> dict[Recipe, dict]:
    """Every recipe of `space` fused in memory and scored on calib and (here only) test."""
    prepared = prepare(models, FusionSpec(), calib, collect_activations=False)
    calib_set, test_set = load_eval_set(models[0], calib), load_eval_set(models[0], test)
    results: dict[Recipe, dict] = {}

    def both(recipe, model, data):
        metrics = score_recipe(recipe, model, data, "cpu")
        test_metrics = score_recipe(recipe, model, test_set, "cpu")
        results[recipe] = {"calib": metrics["accuracy"], "test": test_metrics["accuracy"]}
        return metrics

    run_search(prepared, space, calib_set, score=both)
    return results


def grid(models, calib, test) -> dict[Recipe, dict]:
    space = SearchSpace.auto(FusionSpec(), budget=10_000, seconds=None)
    return scored(models, calib, test, space)


def table_best(models, calib, test) -> dict:
    """bench/digits_table.py's rows (anchor 0): EMD, or Sinkhorn chosen on calib."""
    recipes = [
        Recipe(0, alignment, residual, heads, solver, reg)
        for heads, residual in TABLE_RECIPES.values()
        for alignment in ("weights", "activations")
        for solver, reg in [("emd", None), *[("sinkhorn", r) for r in TABLE_REGS]]
    ]
    space = SearchSpace("list", recipes=tuple(recipes), budget=len(recipes), seconds=None)
    results = scored(models, calib, test, space)
    rows = []
    for heads, residual in TABLE_RECIPES.values():
        for alignment in ("weights", "activations"):
            for solver in ("emd", "sinkhorn"):
                options = [
                    (r, v)
                    for r, v in results.items()
                    if (r.heads, r.residual, r.alignment, r.solver)
                    == (heads, residual, alignment, solver)
                ]
                rows.append(max(options, key=lambda item: item[1]["calib"]))
    recipe, values = max(rows, key=lambda item: item[1]["test"])
    return {"test": values["test"], "recipe": recipe.to_dict()}


def short(recipe: dict) -> str:
    solver = "emd" if recipe["solver"] == "emd" else f"sinkhorn {recipe['reg']:g}"
    return (
        f"a{recipe['anchor']} {recipe['alignment'][:4]} {recipe['residual']} "
        f"{recipe['heads']} {solver}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-digits"))
    parser.add_argument("--bert-workdir", type=Path, default=Path("runs/bench-bert-digits"))
    parser.add_argument("--pairs", nargs="*", default=["0-1", "2-3", "0-2"])
    parser.add_argument("--no-grid", action="store_true", help="skip the 144-recipe oracle")
    parser.add_argument("--no-bert", action="store_true")
    args = parser.parse_args()
    pairs = [tuple(int(s) for s in p.split("-")) for p in args.pairs]
    vits = vit_parents(args.workdir, {s for p in pairs for s in p})
    cases = [
        (
            f"ViT seeds {a},{b}",
            [vits[a], vits[b]],
            args.workdir / "calib.safetensors",
            args.workdir / "test.safetensors",
            True,
        )
        for a, b in pairs
    ]
    if not args.no_bert:
        berts, bert_calib, bert_test = bert_parents(args.bert_workdir)
        cases.append(("BERT digit sequences, seeds 0,1", berts, bert_calib, bert_test, False))
    rows = []
    for name, models, calib, test, in_table in cases:
        log(f"{name}: default recipe")
        default = job_accuracy(models, calib, test, None, FusionSpec())
        log(f"{name}: auto")
        auto = job_accuracy(models, calib, test, SearchSpace.auto(FusionSpec()), FusionSpec())
        row = {"pair": name, "default": default, "auto": auto}
        if in_table:
            log(f"{name}: the benchmark table's rows")
            row["table"] = table_best(models, calib, test)
        if not args.no_grid:
            log(f"{name}: the whole grid")
            results = grid(models, calib, test)
            best, values = max(results.items(), key=lambda item: item[1]["test"])
            row["grid"] = {"test": values["test"], "recipe": best.to_dict(), "size": len(results)}
        rows.append(row)
    print(
        "\n| pair | parents | vanilla | default recipe | table best | auto (chosen recipe) "
        "| auto - table best | grid best (oracle) | auto: recipes, s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        a, d = row["auto"], row["default"]
        table = row.get("table")
        gap = f"{a['test'] - table['test']:+.3f}" if table else ""
        table_cell = f"{table['test']:.3f} ({short(table['recipe'])})" if table else ""
        grid_cell = (
            f"{row['grid']['test']:.3f} ({short(row['grid']['recipe'])})" if "grid" in row else ""
        )
        print(
            f"| {row['pair']} | {', '.join(f'{p:.3f}' for p in d['parents'])} | "
            f"{d['vanilla']:.3f} | {d['test']:.3f} | {table_cell} | "
            f"{a['test']:.3f} ({short(a['recipe'])}) | {gap} | {grid_cell} | "
            f"{a['points']}, {a['seconds']:.0f} |"
        )
    gaps = [r["auto"]["test"] - r["table"]["test"] for r in rows if "table" in r]
    if gaps:
        spread = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
        print(
            f"\nauto - table best over {len(gaps)} ViT pairs: mean {statistics.mean(gaps):+.3f}"
            f" ± {spread:.3f} (std), min {min(gaps):+.3f}"
        )
    name = "_".join(args.pairs) + ("" if args.no_bert else "_bert")
    (args.workdir / f"recipe_search-{name}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
