"""Wall time and peak memory of fusing two BERT-base-size models (random init).

    python bench/bert_base_timing.py [--device cpu] [--workdir runs/bench-bert]

Prints a table; figures are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path

import torch
import transformers

from fusion_core import FusionSpec, fuse

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-bert"))
    parser.add_argument("--reg", type=float, default=0.05)
    parser.add_argument(
        "--methods",
        default="sinkhorn,emd,shared",
        help="comma-separated subset of sinkhorn, emd, shared",
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    parents = make_parents(args.workdir)
    rows = []
    methods = {
        "sinkhorn": ("weights + Sinkhorn", dict(solver="sinkhorn", reg=args.reg)),
        "emd": ("weights + EMD", dict(solver="emd")),
        "shared": (
            "weights + Sinkhorn, shared stream",
            dict(solver="sinkhorn", reg=args.reg, residual="shared"),
        ),
    }
    for key in args.methods.split(","):
        name, options = methods[key]
        spec = FusionSpec(device=args.device, **options)
        out = args.workdir / "fused"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        fuse(parents, out, spec)
        rows.append((name, time.perf_counter() - started))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(
        f"BERT-base pair (110M parameters each), device={args.device}, "
        f"torch threads={torch.get_num_threads()}"
    )
    print(f"| {'method':<34} | {'wall s':>7} |")
    print(f"|{'-' * 36}|{'-' * 9}|")
    for name, seconds in rows:
        print(f"| {name:<34} | {seconds:>7.1f} |")
    print(f"peak RSS of the process: {peak:.2f} GiB")


if __name__ == "__main__":
    main()
