"""Which solver point should an auto search screen its structures at? Every recipe of the
auto space is fused and scored on calibration and test once per pair; then the real
`run_search` (default budget, 32 recipes) runs again with each screening point, its scores
read from that table, and the recipe it chooses is looked up on test.

    python bench/search_screening.py [--workdir runs/bench-digits]
                                     [--bert-workdir runs/bench-bert-digits]
                                     [--vit-pairs 0-1 2-3 0-4 1-2 3-4 4-5 1-3 0-2]
                                     [--bert-pairs 0-1 2-3]

Parents: the digits ViTs of bench/digits_table.py and the BERTs on digit sequences of
bench/recipe_search.py (cached, trained when missing). Prints one row per pair (test
accuracy of the recipe chosen when screening at each point, and the best of all 144 on test,
an oracle) and the mean gap to the oracle. The grids are cached in --workdir/grid-*.json.
Figures are recorded in docs/benchmarks.md ("Recipe search").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import transformers
from recipe_search import bert_parents, short, vit_parents  # bench/, beside this script

import fusion_core.search
from fusion_core import FusionSpec
from fusion_core.api import prepare
from fusion_core.contract import SCREEN_POINT, Point, SearchSpace
from fusion_core.evaluate import load_eval_set
from fusion_core.search import run_search, score_recipe

transformers.utils.logging.disable_progress_bar()
SCREENS = (Point("emd"), SCREEN_POINT, Point("sinkhorn", 0.055))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def grid(file: Path, models: list[Path], calib: Path, test: Path) -> dict[str, dict]:
    """recipe label -> {"recipe", "calib", "test"} for all 144 recipes (cached in `file`)."""
    if file.is_file():
        return {row["label"]: row for row in json.loads(file.read_text())}
    prepared = prepare(models, FusionSpec(), calib, collect_activations=False)
    test_set = load_eval_set(models[0], test)
    rows = {}

    def both(recipe, model, data):
        metrics = score_recipe(recipe, model, data, "cpu")
        rows[recipe.label] = {
            "label": recipe.label,
            "recipe": recipe.to_dict(),
            "calib": metrics,
            "test": score_recipe(recipe, model, test_set, "cpu"),
        }
        return metrics

    space = SearchSpace.auto(FusionSpec(), budget=10_000, seconds=None)
    run_search(prepared, space, load_eval_set(models[0], calib), score=both)
    file.write_text(json.dumps(list(rows.values()), indent=1) + "\n")
    return rows


def searched(models: list[Path], calib: Path, table: dict[str, dict], screen: Point) -> dict:
    """The default auto search, screening at `screen`, its scores read from `table`."""
    saved = fusion_core.search.SCREEN_POINT
    fusion_core.search.SCREEN_POINT = screen
    try:
        prepared = prepare(models, FusionSpec(), calib, collect_activations=False)
        result = run_search(
            prepared,
            SearchSpace.auto(FusionSpec()),
            load_eval_set(models[0], calib),
            score=lambda recipe, model, data: table[recipe.label]["calib"],
        )
    finally:
        fusion_core.search.SCREEN_POINT = saved
    return table[result.recipe.label]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-digits"))
    parser.add_argument("--bert-workdir", type=Path, default=Path("runs/bench-bert-digits"))
    parser.add_argument(
        "--vit-pairs", nargs="*", default=["0-1", "2-3", "0-4", "1-2", "3-4", "4-5", "1-3", "0-2"]
    )
    parser.add_argument("--bert-pairs", nargs="*", default=["0-1", "2-3"])
    args = parser.parse_args()
    vit_pairs = [tuple(int(s) for s in p.split("-")) for p in args.vit_pairs]
    vits = vit_parents(args.workdir, {s for p in vit_pairs for s in p})
    calib, test = args.workdir / "calib.safetensors", args.workdir / "test.safetensors"
    cases = [(f"ViT {a},{b}", [vits[a], vits[b]], calib, test) for a, b in vit_pairs]
    for pair in args.bert_pairs:
        seeds = tuple(int(s) for s in pair.split("-"))
        models, bert_calib, bert_test = bert_parents(args.bert_workdir, seeds=seeds)
        cases.append((f"BERT {pair.replace('-', ',')}", models, bert_calib, bert_test))
    gaps: dict[Point, list[float]] = {p: [] for p in SCREENS}
    lines = []
    for name, models, pair_calib, pair_test in cases:
        log(f"{name}: the grid")
        slug = name.lower().replace(" ", "-").replace(",", "-")
        table = grid(args.workdir / f"grid-{slug}.json", models, pair_calib, pair_test)
        oracle = max(table.values(), key=lambda row: row["test"]["accuracy"])
        cells = []
        for screen in SCREENS:
            log(f"{name}: the search screening at {screen.label}")
            row = searched(models, pair_calib, table, screen)
            gaps[screen].append(row["test"]["accuracy"] - oracle["test"]["accuracy"])
            cells.append(f"{row['test']['accuracy']:.3f} ({short(row['recipe'])})")
        best = f"{oracle['test']['accuracy']:.3f} ({short(oracle['recipe'])})"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {best} |")
    header = " | ".join(f"screened at {p.label}" for p in SCREENS)
    print(f"\n| pair | {header} | best of 144 on test (oracle) |")
    print("|---|" + "---|" * (len(SCREENS) + 1))
    print("\n".join(lines))
    print()
    for screen, values in gaps.items():
        found = sum(v == 0 for v in values)
        print(
            f"screened at {screen.label}: {statistics.mean(values):+.3f} ± "
            f"{statistics.stdev(values):.3f} below the oracle (mean ± std over {len(values)} "
            f"pairs), min {min(values):+.3f}, the oracle's recipe found on {found}"
        )


if __name__ == "__main__":
    main()
