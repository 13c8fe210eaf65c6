"""Memory of activation collection: a parent loaded whole against one streamed module by module
(fusion_core/streamed.py), on Llama-3.2-1B-shaped parents of growing depth.

    python bench/streamed_activations.py [--workdir runs/scale] [--depths 4,8,16]
                                         [--sequences 64] [--tokens 128]

Each run is a child process (peak RSS from wait4, as in bench/scale.py, whose random bf16
parents it reuses): `fusion_core.api.prepare` for activation alignment of the parent with
itself (two collection passes, every tap of the family; batches of 32 of --sequences
sequences of --tokens random token ids), and the parameter bytes a streamed model held at
most. Modes: `whole` (transformers' from_pretrained), `streamed` (the default 256 MiB cache,
then module by module), `streamed-no-cache`. Run from a checkout of an older commit (the
script copied there) with `--modes whole`, it measures collection as it was then. Prints one
table; figures in docs/benchmarks.md ("Scale").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from scale import llama_pair, measured  # bench/, beside this script

REPO = Path(__file__).resolve().parent.parent
MODES = {"whole": None, "streamed": -1, "streamed-no-cache": 0}


def child(args) -> None:
    """In the child: the product's activation collection for a pair (the parent and itself:
    two passes), then a JSON line with its figures."""
    sys.path.insert(0, str(REPO))
    import torch
    from safetensors.torch import save_file

    import fusion_core.activations
    from fusion_core import FusionSpec
    from fusion_core.api import prepare

    torch.set_num_threads(2)
    config = json.loads((args.model / "config.json").read_text())
    data = args.model.parent / f"calib-{args.sequences}x{args.tokens}.safetensors"
    if not data.is_file():
        gen = torch.Generator().manual_seed(0)
        shape = (args.sequences, args.tokens)
        ids = torch.randint(0, config["vocab_size"], shape, generator=gen)
        save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(data))
    held = []
    if args.cache is None:  # what collection did before: each parent loaded whole

        def whole(parent, device="cpu"):
            model = fusion_core.activations.load_live_model(
                parent.path, parent.architecture, device
            )
            return SimpleNamespace(model=model, close=lambda: None)

        fusion_core.activations.streamed_model = whole
    else:
        from fusion_core.streamed import CACHE_BYTES, streamed_model

        cache = CACHE_BYTES if args.cache < 0 else args.cache

        def streamed(parent, device="cpu"):
            held.append(streamed_model(parent, device, cache_bytes=cache))
            return held[-1]

        fusion_core.activations.streamed_model = streamed
    started = time.perf_counter()
    spec = FusionSpec(alignment="activations", samples=args.sequences)
    prepare([args.model, args.model], spec, data)
    figures = {"seconds": time.perf_counter() - started}
    if held:
        figures["peak_param_bytes"] = max(s.peak_bytes for s in held)
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "scale")
    parser.add_argument("--depths", default="4,8,16")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--modes", default=",".join(MODES), help="of: " + ", ".join(MODES))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.model = args.child
        child(args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        model = llama_pair(args.workdir, depth)[0]
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        for mode in args.modes.split(","):
            cache = MODES[mode]
            command = [sys.executable, __file__, "--child", str(model)]
            command += ["--sequences", str(args.sequences), "--tokens", str(args.tokens)]
            if cache is not None:
                command += ["--cache", str(cache)]
            run = measured(command)
            held = run.extra.get("peak_param_bytes")
            rows.append((depth, size, mode, run, held, model))
            note = f"{depth} layers, {mode}: {run.seconds:.1f} s, {run.peak_rss >> 20} MiB"
            print(note, file=sys.stderr, flush=True)
    print(
        "\n| layers | checkpoint MiB | mode | wall s | peak RSS MiB | weights held at most MiB "
        "| plan MiB (streamed) |"
    )
    print("|---|---|---|---|---|---|---|")
    for depth, size, mode, run, held, model in rows:
        held_cell = f"{held / 2**20:,.0f}" if held is not None else "all"
        estimate = collection_estimate(args, model) if mode == "streamed" else None
        plan_cell = f"{estimate / 2**20:,.0f}" if estimate else ""
        print(
            f"| {depth} | {size / 2**20:,.0f} | {mode} | {run.seconds:.1f} | "
            f"{run.peak_rss / 2**20:,.0f} | {held_cell} | {plan_cell} |"
        )


def collection_estimate(args, model: Path) -> int | None:
    """`otfuse plan`'s peak for the collection phase of the same job (torch-free)."""
    sys.path.insert(0, str(REPO))
    from fusion_core import FusionSpec
    from fusion_core.plan import LocalFolder, plan

    folder = LocalFolder(model)
    spec = FusionSpec(alignment="activations", samples=args.sequences)
    tokens = args.sequences * args.tokens
    return plan([folder, folder], spec, data_tokens=tokens).estimate.collection_peak_bytes


if __name__ == "__main__":
    main()
