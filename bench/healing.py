"""Healing at a fixed budget: plain finetuning against distillation from the parents.

    python bench/healing.py [--workdir runs/bench-digits] [--pairs 0-1,2-3,4-5]
                            [--ft-seeds 0,1,2] [--steps 200] [--lr 1e-3] [--distill 0.9]
                            [--temperature 4] [--curve 50,100,200,400]

For each pair of digits ViTs (hidden 64, seeds as in bench/digits_table.py, trained once and
cached in --workdir) three starting points are healed with the same budget (--steps of batch
64, peak --lr, AdamW, warmup then cosine) on the training split:
- fused: what a job with calibration data publishes by default: the recipe search
  (`--policy auto`, default budget) on the calibration split;
- vanilla: vanilla fusion of the same pair;
- best parent: the parent with the higher calibration accuracy;
each with plain finetuning (labels) and with distillation from the pair's ensemble
(loss = (1 - a) CE + a T^2 KL(teacher_T || model_T)), for every finetune seed. Prints test
accuracy mean ± std over pairs x finetune seeds. With --hetero, the narrow ViT (hidden 48,
seed 5) fused with hidden-64 partners (rms, activations, shared stream, Sinkhorn 0.1 or 0.3
on calibration) is healed against the narrow anchor healed the same way. With --curve, the 5-model
fusion (seeds 0-4) is healed at growing budgets with both modes (finetune seed 0).
Results accumulate in --workdir/healing-results.json (finished runs are not redone).
Figures are recorded in docs/benchmarks.md and docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import transformers

from fusion_core import FinetuneConfig, FusionSpec, evaluate, finetune, fuse, fuse_job
from fusion_core.contract import SearchSpace
from otfuse.digits import load_digits_splits, save_model, save_split, train_vit

transformers.utils.logging.disable_progress_bar()
STARTS = ("fused", "vanilla", "best parent")
HETERO_RECIPE = FusionSpec(
    alignment="activations", solver="sinkhorn", residual="shared", rectangular="rms", samples=180
)
MODES = ("plain", "distill")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Healing:
    def __init__(self, workdir: Path, args: argparse.Namespace):
        self.workdir = workdir
        self.args = args
        self.file = workdir / "healing-results.json"
        self.results = json.loads(self.file.read_text()) if self.file.is_file() else {}
        splits = load_digits_splits()
        for name, split in (
            ("test", splits.test),
            ("calib", splits.calib),
            ("train", splits.train),
        ):
            if not (workdir / f"{name}.safetensors").is_file():
                save_split(split, workdir / f"{name}.safetensors")
        self.splits = splits

    def split(self, name: str) -> Path:
        return self.workdir / f"{name}.safetensors"

    def parent(self, seed: int) -> Path:
        folder = self.workdir / f"seed{seed}"
        if not (folder / "model.safetensors").is_file():
            log(f"training seed{seed}")
            save_model(train_vit(seed, self.splits, epochs=40, hidden=64), folder)
        return folder

    def save(self) -> None:
        self.file.write_text(json.dumps(self.results, indent=2) + "\n")

    def starts(self, key: str, parents: list[Path]) -> dict:
        """The one-shot starting points of a pair (cached in the results)."""
        entry = self.results.setdefault(key, {})
        if "starts" in entry and all(Path(p).is_dir() for p in entry["starts"]["folders"].values()):
            return entry["starts"]
        calib = [evaluate(p, self.split("calib"))["accuracy"] for p in parents]
        best = calib.index(max(calib))
        folders = {"best parent": str(parents[best])}
        fused = self.workdir / f"heal-{key}-fused"
        shutil.rmtree(fused, ignore_errors=True)
        spec = FusionSpec()
        job = fuse_job(
            parents, fused, spec, search=SearchSpace.auto(spec), calib_data=self.split("calib")
        )
        folders["fused"] = str(fused)
        vanilla = self.workdir / f"heal-{key}-vanilla"
        shutil.rmtree(vanilla, ignore_errors=True)
        fuse(parents, vanilla, FusionSpec(method="vanilla"))
        folders["vanilla"] = str(vanilla)
        one_shot = {n: evaluate(f, self.split("test"))["accuracy"] for n, f in folders.items()}
        parents_test = [evaluate(p, self.split("test"))["accuracy"] for p in parents]
        entry["starts"] = {
            "folders": folders,
            "recipe": job.metrics["sweep"]["chosen"],
            "best_parent": best,
            "parents_test": parents_test,
            "one_shot_test": one_shot,
        }
        self.save()
        return entry["starts"]

    def hetero_starts(self, key: str, parents: list[Path]) -> dict:
        """48 <- 64: the fusion into the narrow anchor (rms, activations, shared stream,
        Sinkhorn 0.1 or 0.3 chosen on calibration) and the anchor itself."""
        entry = self.results.setdefault(key, {})
        if "starts" in entry and all(Path(p).is_dir() for p in entry["starts"]["folders"].values()):
            return entry["starts"]
        calib = {}
        for reg in (0.1, 0.3):
            out = self.workdir / f"heal-{key}-fused-{reg:g}"
            shutil.rmtree(out, ignore_errors=True)
            spec = FusionSpec(**{**HETERO_RECIPE.to_dict(), "reg": reg})
            fuse(parents, out, spec, data=self.split("calib"))
            calib[reg] = evaluate(out, self.split("calib"))["accuracy"]
        chosen = max(calib, key=calib.get)
        folders = {"fused": str(self.workdir / f"heal-{key}-fused-{chosen:g}")}
        folders["anchor"] = str(parents[0])
        entry["starts"] = {
            "folders": folders,
            "reg": chosen,
            "parents_test": [evaluate(p, self.split("test"))["accuracy"] for p in parents],
            "one_shot_test": {
                n: evaluate(f, self.split("test"))["accuracy"] for n, f in folders.items()
            },
        }
        self.save()
        return entry["starts"]

    def heal(self, key: str, parents: list[Path], start: str, mode: str, seed: int, steps: int):
        runs = self.results.setdefault(key, {}).setdefault("runs", {})
        name = f"{start}|{mode}|{seed}|{steps}|lr {self.args.lr:g}"
        if mode == "distill":
            name += f"|{self.args.distill:g}|{self.args.temperature:g}"
        if name in runs:
            return runs[name]
        source = self.results[key]["starts"]["folders"][start]
        distill = self.args.distill if mode == "distill" else 0.0
        config = FinetuneConfig(
            steps=steps,
            lr=self.args.lr,
            batch_size=64,
            seed=seed,
            distill=distill,
            temperature=self.args.temperature,
        )
        target = self.workdir / "heal-run"
        shutil.rmtree(target, ignore_errors=True)
        started = time.perf_counter()
        finetune(source, self.split("train"), target, config, teachers=parents)
        metrics = evaluate(target, self.split("test"))
        runs[name] = {**metrics, "seconds": round(time.perf_counter() - started, 1)}
        shutil.rmtree(target, ignore_errors=True)
        self.save()
        log(f"{key} {name}: {metrics['accuracy']:.3f}")
        return runs[name]


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f} (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-digits"))
    parser.add_argument("--pairs", default="0-1,2-3,4-5", help="empty: none")
    parser.add_argument("--ft-seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak (the README's)")
    parser.add_argument("--distill", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--curve", default="", help="5 models: budgets, e.g. 50,100,200,400")
    parser.add_argument(
        "--hetero", default="", help="48 <- 64: seeds of the hidden-64 partners, e.g. 0,1,2"
    )
    parser.add_argument("--starts", default=",".join(STARTS), help="of: " + ", ".join(STARTS))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    bench = Healing(args.workdir, args)
    pairs = [tuple(int(s) for s in p.split("-")) for p in args.pairs.split(",") if p]
    seeds = [int(s) for s in args.ft_seeds.split(",") if s.strip()]
    table: dict[tuple[str, str], list[float]] = {}
    one_shot: dict[str, list[float]] = {}
    best_parent: list[float] = []
    # seed-major: every pair gets its first finetune seed before any gets its second
    parent_of_run: list[float] = []  # the better parent's test accuracy, run by run
    for seed in seeds:
        for pair in pairs:
            key = f"pair {pair[0]}-{pair[1]}"
            parents = [bench.parent(s) for s in pair]
            starts = bench.starts(key, parents)
            parent_of_run.append(max(starts["parents_test"]))
            for start in [s for s in STARTS if s in args.starts.split(",")]:
                for mode in MODES:
                    run = bench.heal(key, parents, start, mode, seed, args.steps)
                    table.setdefault((start, mode), []).append(run["accuracy"])
    for pair in pairs:
        starts = bench.results[f"pair {pair[0]}-{pair[1]}"]["starts"]
        best_parent.append(max(starts["parents_test"]))
        for name, value in starts["one_shot_test"].items():
            one_shot.setdefault(name, []).append(value)
    if pairs:
        print(f"\n### Healing, {args.steps} steps (test accuracy, mean ± std over pairs x seeds)\n")
        print(f"Best parent (test, per pair): {mean_std(best_parent)}\n")
        print("| start | one-shot | + plain finetune | + distillation |")
        print("|---|---|---|---|")
        for start in STARTS:
            cells = [mean_std(table.get((start, mode), [])) for mode in MODES]
            shot = mean_std(one_shot.get(start, []))
            print(f"| {start} | {shot} | " + " | ".join(cells) + " |")
        print("\nPaired by pair and finetune seed:")
        for mode in MODES:
            fused = table.get(("fused", mode), [])
            if len(fused) == len(parent_of_run):
                gaps = [f - p for f, p in zip(fused, parent_of_run, strict=True)]
                print(f"- fused + {mode} minus the better parent (test): {mean_std(gaps)}")
            vanilla = table.get(("vanilla", mode), [])
            if fused and len(vanilla) == len(fused):
                gaps = [f - v for f, v in zip(fused, vanilla, strict=True)]
                print(f"- fused + {mode} minus vanilla + {mode}: {mean_std(gaps)}")
    hetero = [int(w) for w in args.hetero.split(",") if w.strip()]
    if hetero:
        narrow = bench.workdir / "narrow"
        if not (narrow / "model.safetensors").is_file():
            save_model(train_vit(5, bench.splits, epochs=40, hidden=48), narrow)
        cells: dict[tuple[str, str], list[float]] = {}
        shots: dict[str, list[float]] = {}
        for seed in seeds:
            for wide in hetero:
                key = f"48 <- 64 seed{wide}"
                parents = [narrow, bench.parent(wide)]
                starts = bench.hetero_starts(key, parents)
                for start in ("fused", "anchor"):
                    for mode in MODES:
                        run = bench.heal(key, parents, start, mode, seed, args.steps)
                        cells.setdefault((start, mode), []).append(run["accuracy"])
        for wide in hetero:
            for name, value in bench.results[f"48 <- 64 seed{wide}"]["starts"][
                "one_shot_test"
            ].items():
                shots.setdefault(name, []).append(value)
        print(
            f"\n### 48 <- 64, {args.steps} steps (the narrow anchor and hidden-64 seeds {hetero})\n"
        )
        print("| start | one-shot | + plain finetune | + distillation |")
        print("|---|---|---|---|")
        for start in ("fused", "anchor"):
            cells_ = [mean_std(cells.get((start, mode), [])) for mode in MODES]
            print(f"| {start} | {mean_std(shots[start])} | " + " | ".join(cells_) + " |")
    budgets = [int(b) for b in args.curve.split(",") if b.strip()]
    if budgets:
        key = "5 models"
        parents = [bench.parent(s) for s in range(5)]
        starts = bench.starts(key, parents)
        print("\n### 5 models: test accuracy against the healing budget (finetune seed 0)\n")
        print(
            f"One-shot: fused {starts['one_shot_test']['fused']:.3f}, "
            f"vanilla {starts['one_shot_test']['vanilla']:.3f}; parents "
            + ", ".join(f"{a:.3f}" for a in starts["parents_test"])
            + "\n"
        )
        print("| steps | fused + plain | fused + distill | vanilla + plain | vanilla + distill |")
        print("|---|---|---|---|---|")
        for steps in budgets:
            cells = [
                f"{bench.heal(key, parents, start, mode, 0, steps)['accuracy']:.3f}"
                for start in ("fused", "vanilla")
                for mode in MODES
            ]
            print(f"| {steps} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
