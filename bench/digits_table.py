"""The paper's Table 1 at digits scale: one-shot accuracy of fused ViTs.

    python bench/digits_table.py [--workdir runs/bench-digits] [--epochs 40]

Trains five ViTs (hidden 64, 3 layers, 4 heads) on scikit-learn's digits from seeds 0-4
and one narrower ViT (hidden 48), caches them in --workdir, then fuses 2 and 5 of them:
vanilla, and OT with weights or activations, EMD or the best Sinkhorn regularizer of a sweep
(chosen on the calibration split, reported on the test split). Two recipes: the paper's
(cross-head alignment, averaged residual TMs) and otfuse's default-for-quality (heads
matched one to one, one shared residual-stream TM). Prints markdown tables; results also go
to --workdir/results.json. Figures are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import transformers

from fusion_core import FusionSpec, evaluate, fuse
from otfuse.digits import load_digits_splits, save_model, save_split, train_vit

transformers.utils.logging.disable_progress_bar()
REGS = (0.01, 0.03, 0.1, 0.3)
RECIPES = {
    "paper": {"heads": "cross", "residual": "average"},
    "otfuse": {"heads": "matched", "residual": "shared"},
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parents(workdir: Path, epochs: int) -> dict[str, Path]:
    splits = load_digits_splits()
    save_split(splits.test, workdir / "test.safetensors")
    save_split(splits.calib, workdir / "calib.safetensors")
    models = {f"seed{s}": {"seed": s, "hidden": 64} for s in range(5)}
    models["narrow"] = {"seed": 5, "hidden": 48}
    folders = {}
    for name, recipe in models.items():
        folder = workdir / name
        if not (folder / "model.safetensors").is_file():
            log(f"training {name} ({epochs} epochs)")
            save_model(
                train_vit(recipe["seed"], splits, epochs=epochs, hidden=recipe["hidden"]), folder
            )
        folders[name] = folder
    return folders


class Bench:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.test = workdir / "test.safetensors"
        self.calib = workdir / "calib.safetensors"

    def accuracy(self, folder: Path, split: str = "test") -> float:
        return evaluate(folder, self.test if split == "test" else self.calib)["accuracy"]

    def fuse(self, models: list[Path], spec: FusionSpec) -> tuple[Path, float]:
        out = self.workdir / "fused"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        fuse(models, out, spec, data=self.calib)
        return out, time.perf_counter() - started

    def row(self, models: list[Path], **spec) -> dict:
        """One configuration; with solver=sinkhorn, the best regularizer on calib."""
        regs = REGS if spec.get("solver") == "sinkhorn" else (None,)
        best = None
        for reg in regs:
            chosen = dict(spec, reg=reg) if reg else spec
            out, seconds = self.fuse(models, FusionSpec(**chosen))
            calib = self.accuracy(out, "calib")
            if best is None or calib > best["calib"]:
                best = {"reg": reg, "calib": calib, "test": self.accuracy(out), "seconds": seconds}
        return best


def table(bench: Bench, models: list[Path], title: str) -> list[dict]:
    rows = []
    parents_acc = [bench.accuracy(m) for m in models]
    rows.append({"method": "parents", "test": parents_acc})
    if len({bench_width(m) for m in models}) == 1:
        rows.append({"method": "vanilla", **bench.row(models, method="vanilla")})
    for recipe, flags in RECIPES.items():
        for alignment in ("weights", "activations"):
            for solver in ("emd", "sinkhorn"):
                shown = "EMD" if solver == "emd" else "Sinkhorn"
                name = f"{recipe}: OT-{alignment[:4]} {shown}"
                log(f"{title}: {name}")
                rows.append(
                    {
                        "method": name,
                        **bench.row(models, alignment=alignment, solver=solver, **flags),
                    }
                )
    print(f"\n### {title}\n")
    print("| method | test acc | reg (chosen on calib) | fusion s |")
    print("|---|---|---|---|")
    for row in rows:
        if row["method"] == "parents":
            print(f"| parents | {', '.join(f'{a:.3f}' for a in row['test'])} | | |")
        else:
            reg = "" if row.get("reg") is None else f"{row['reg']:g}"
            print(f"| {row['method']} | {row['test']:.3f} | {reg} | {row['seconds']:.2f} |")
    return rows


def bench_width(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["hidden_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-digits"))
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    folders = parents(args.workdir, args.epochs)
    bench = Bench(args.workdir)
    seeds = [folders[f"seed{s}"] for s in range(5)]
    results = {
        "2 models": table(bench, seeds[:2], "2 models (anchor seed 0)"),
        "5 models": table(bench, seeds, "5 models (anchor seed 0)"),
        "48 <- 64": table(
            bench, [folders["narrow"], seeds[0]], "heterogeneous: anchor hidden 48 <- hidden 64"
        ),
        "64 <- 48": table(
            bench, [seeds[0], folders["narrow"]], "heterogeneous: anchor hidden 64 <- hidden 48"
        ),
    }
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
