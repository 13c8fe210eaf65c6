"""Decoders: one-shot and finetuned fusions of character-level causal LMs.

    python bench/charlm_finetune.py [--family llama|gpt2] [--pairs 3] [--parent-steps 600]
                                    [--steps 200] [--lr 1e-3] [--workdir runs/bench-charlm]

Parents (otfuse/charlm.py): 2 layers, hidden 64, 4 heads (Llama: 2 key/value heads, rotary
embeddings, SwiGLU, untied head; GPT-2: tied head), trained on license texts for
--parent-steps from seeds 2k and 2k+1 for pair k, cached in --workdir. Each pair is one
`fusion_core.fuse_job`: activations-based OT with one shared residual-stream map, the
regularizer swept ("auto": EMD and Sinkhorn 0.01..0.3) and chosen on the calibration split,
every model scored on the test split (next-character loss), then --steps finetunes of the
chosen fusion and of vanilla fusion on the training split. A control finetunes the anchor
parent with the same budget. Everything runs on one CPU thread. Prints one markdown table
(mean ± half the range over the pairs); the numbers go to --workdir/<family>-results.json.
Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers

from fusion_core import FinetuneConfig, FusionSpec, evaluate, finetune, fuse_job
from otfuse.charlm import char_splits, save_model, save_split, train_char_lm

transformers.utils.logging.disable_progress_bar()
RECIPE = FusionSpec(alignment="activations", residual="shared")
ROWS = (
    ("parent (anchor)", "parent 0"),
    ("parent (other)", "parent 1"),
    ("ensemble", "ensemble"),
    ("vanilla", "vanilla"),
    ("OT one-shot", "fused"),
    ("vanilla + finetune", "vanilla+finetune"),
    ("OT + finetune", "fused+finetune"),
    ("anchor + finetune (control)", "anchor+finetune"),
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def data_files(workdir: Path) -> dict[str, Path]:
    splits = char_splits()
    files = {}
    for name in ("train", "calib", "test"):
        files[name] = workdir / f"{name}.safetensors"
        if not files[name].is_file():
            save_split(getattr(splits, name), files[name])
    return files


def parent(workdir: Path, family: str, seed: int, steps: int) -> Path:
    folder = workdir / f"{family}-seed{seed}"
    if not (folder / "model.safetensors").is_file():
        started = time.perf_counter()
        save_model(train_char_lm(seed, char_splits(), family, steps=steps), folder)
        log(f"trained {folder.name} ({steps} steps) in {time.perf_counter() - started:.0f}s")
    return folder


def pair_result(workdir: Path, models: list[Path], files: dict, config: FinetuneConfig) -> dict:
    out = workdir / f"job-{models[0].name}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = fuse_job(
        models,
        out,
        RECIPE,
        regs="auto",
        data=files["calib"],
        eval_data=files["test"],
        finetune_config=config,
        finetune_data=files["train"],
        finetune_baselines=["vanilla"],
        stage=lambda s: log(f"{models[0].name}: {s}"),
    )
    losses = {r["name"]: r["metrics"]["loss"] for r in result.metrics["evaluation"]}
    control = workdir / f"control-{models[0].name}"
    shutil.rmtree(control, ignore_errors=True)
    finetune(models[0], files["train"], control, config, name="anchor")
    losses["anchor+finetune"] = evaluate(control, files["test"])["loss"]
    shutil.rmtree(control, ignore_errors=True)
    chosen = result.metrics["sweep"]["chosen"]
    return {
        "losses": losses,
        "chosen": "emd" if chosen["solver"] == "emd" else f"sinkhorn {chosen['reg']:g}",
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=("llama", "gpt2"), default="llama")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--parent-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-charlm"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    files = data_files(args.workdir)
    config = FinetuneConfig(steps=args.steps, lr=args.lr, batch_size=32, device="cpu", distill=0.0)
    results = []
    for k in range(args.pairs):
        models = [
            parent(args.workdir, args.family, s, args.parent_steps) for s in (2 * k, 2 * k + 1)
        ]
        results.append(pair_result(args.workdir, models, files, config))
        log(f"pair {k}: {results[-1]}")
    (args.workdir / f"{args.family}-results.json").write_text(json.dumps(results, indent=2))
    print(table(results, args))


def table(results: list[dict], args) -> str:
    pairs = [f"pair {k} (seeds {2 * k},{2 * k + 1})" for k in range(len(results))]
    lines = [
        f"{args.family}, test next-character loss (parents {args.parent_steps} steps; "
        f"finetunes {args.steps} steps, lr {args.lr:g})",
        "",
        "| model | " + " | ".join(pairs) + " | mean ± spread |",
        "|---" * (len(pairs) + 2) + "|",
    ]
    for label, key in ROWS:
        values = [r["losses"][key] for r in results]
        mean, spread = sum(values) / len(values), (max(values) - min(values)) / 2
        cells = " | ".join(f"{v:.3f}" for v in values)
        lines.append(f"| {label} | {cells} | {mean:.3f} ± {spread:.3f} |")
    chosen = ", ".join(r["chosen"] for r in results)
    seconds = ", ".join(f"{r['seconds']:.0f}" for r in results)
    lines += ["", f"OT regularizer chosen on calibration data: {chosen}; job seconds: {seconds}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
