"""fuse_job's CUDA paths in one run: activations, OT, evaluation and a bf16-autocast finetune
on the GPU, then the digits 2-model job of bench/digits_finetune.py on the GPU.

    python3 bench/gpu_job_check.py [--workdir runs/bench-digits] [--steps 200] [--lr 2e-3]

Needs a CUDA device; the digits part needs the cached parents and splits in --workdir.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from factories import image_data, save, tiny_vit

from fusion_core import FinetuneConfig, FusionSpec, fuse_job

transformers.utils.logging.disable_progress_bar()


def tiny_job(root: Path) -> None:
    models = [save(tiny_vit(seed=s), root / f"m{s}") for s in (1, 2)]
    calib = image_data(root / "calib.safetensors", seed=5)
    test = image_data(root / "test.safetensors", seed=6)
    train = image_data(root / "train.safetensors", count=64, seed=7)
    started = time.perf_counter()
    result = fuse_job(
        models,
        root / "out",
        FusionSpec(alignment="activations", residual="shared", device="cuda"),
        regs="emd,0.05",
        data=calib,
        eval_data=test,
        calib_data=calib,
        finetune_config=FinetuneConfig(steps=20, lr=3e-3, batch_size=16),
        finetune_data=train,
        finetune_baselines=["vanilla"],
        save_maps=True,
        report=True,
    )
    metrics = result.metrics
    runs = metrics["finetune"]["runs"]
    assert all(r["steps"] == 20 and r["after"] for r in runs), runs
    assert metrics["finetune"]["config"]["device"] == "cuda"
    weights = load_file(str(root / "out" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())  # autocast, not a cast
    assert (root / "out" / "report.html").stat().st_size > 10_000
    print(
        f"tiny job on cuda OK in {time.perf_counter() - started:.1f}s: losses "
        f"{runs[0]['losses'][0][1]:.3f} -> {runs[0]['losses'][-1][1]:.3f}"
    )


def digits_job(workdir: Path, steps: int, lr: float) -> None:
    out = Path(tempfile.mkdtemp()) / "digits"
    started = time.perf_counter()
    result = fuse_job(
        [workdir / "seed0", workdir / "seed1"],
        out,
        FusionSpec(alignment="activations", residual="shared", samples=180, device="cuda"),
        regs="auto",
        data=workdir / "calib.safetensors",
        eval_data=workdir / "test.safetensors",
        calib_data=workdir / "calib.safetensors",
        finetune_config=FinetuneConfig(steps=steps, lr=lr, batch_size=64, distill=0.0),
        finetune_data=workdir / "train.safetensors",
        finetune_baselines=["vanilla"],
    )
    print(f"digits 2 models on cuda ({time.perf_counter() - started:.1f}s):")
    for row in result.metrics["evaluation"]:
        print(f"  {row['name']:<18} {json.dumps(row['metrics'])}")
    print("  seconds", result.metrics["seconds"])
    shutil.rmtree(out.parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-digits"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    print("torch", torch.__version__, torch.cuda.get_device_name())
    with tempfile.TemporaryDirectory() as tmp:
        tiny_job(Path(tmp))
    if (args.workdir / "seed1" / "model.safetensors").is_file():
        digits_job(args.workdir, args.steps, args.lr)


if __name__ == "__main__":
    main()
