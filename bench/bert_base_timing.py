"""Wall time and peak memory of fusing two BERT-base-size models (random init).

    python bench/bert_base_timing.py [--device cpu] [--workdir runs/bench-bert] [--repeats 3]

Prints a table (median of the repeats, and the part of it spent in OT solves); figures are
recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import time
from pathlib import Path

import torch
import transformers

from fusion_core import FusionSpec, fuse, solvers

transformers.utils.logging.disable_progress_bar()


def make_parents(workdir: Path) -> list[Path]:
    folders = []
    for seed in (0, 1):
        folder = workdir / f"bert-base-{seed}"
        if not (folder / "model.safetensors").is_file():
            torch.manual_seed(seed)
            config = transformers.BertConfig()  # bert-base: 768 hidden, 12 layers, 3072 MLP
            config.architectures = ["BertModel"]
            transformers.BertModel(config).save_pretrained(str(folder))
        folders.append(folder)
    return folders


class SolveTimer:
    """Seconds spent inside `solvers.solve` (the engine and the head matching call it through
    the module, so wrapping the module attribute sees every solve)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._solve = solvers.solve
        solvers.solve = self._timed

    def _timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self._solve(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-bert"))
    parser.add_argument("--reg", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; median shown")
    parser.add_argument(
        "--methods",
        default="sinkhorn,emd,shared",
        help="comma-separated subset of sinkhorn, emd, shared",
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    parents = make_parents(args.workdir)
    timer = SolveTimer()
    methods = {
        "sinkhorn": ("weights + Sinkhorn", dict(solver="sinkhorn", reg=args.reg)),
        "emd": ("weights + EMD (exact)", dict(solver="emd")),
        "shared": (
            "weights + Sinkhorn, shared stream",
            dict(solver="sinkhorn", reg=args.reg, residual="shared"),
        ),
    }
    load_before = os.getloadavg()[0]
    rows = []
    for key in args.methods.split(","):
        name, options = methods[key]
        spec = FusionSpec(device=args.device, **options)
        out = args.workdir / "fused"
        walls, solves = [], []
        for _ in range(args.repeats):
            shutil.rmtree(out, ignore_errors=True)
            timer.seconds = 0.0
            started = time.perf_counter()
            fuse(parents, out, spec)
            walls.append(time.perf_counter() - started)
            solves.append(timer.seconds)
        rows.append((name, walls, statistics.median(solves)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(
        f"BERT-base pair (110M parameters each), device={args.device}, "
        f"torch threads={torch.get_num_threads()}, median of {args.repeats}, "
        f"load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after"
    )
    print(f"| {'method':<34} | {'wall s':>7} | {'of it OT solves s':>17} | {'all runs s':<18} |")
    print(f"|{'-' * 36}|{'-' * 9}|{'-' * 19}|{'-' * 20}|")
    for name, walls, solve in rows:
        runs = ", ".join(f"{w:.1f}" for w in walls)
        print(f"| {name:<34} | {statistics.median(walls):>7.1f} | {solve:>17.1f} | {runs:<18} |")
    print(f"peak RSS of the process: {peak:.2f} GiB")


if __name__ == "__main__":
    main()
