"""`otfuse demo`: the main job end to end on one machine, with nothing to download.

Trains two small ViTs on scikit-learn's digits from different seeds (cached in the work
folder), fuses them with `otfuse fuse`, and evaluates parents, vanilla and OT fusion with
`otfuse eval`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path


def _otfuse(*args: str) -> str:
    command = [sys.executable, "-m", "otfuse", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"otfuse demo: `otfuse {' '.join(args)}` failed:\n{done.stderr}")
    return done.stdout


def run_demo(workdir: Path, epochs: int = 40) -> dict:
    from .digits import cached_parents

    folders, test, calib = cached_parents(
        workdir, epochs, log=lambda message: print(message, file=sys.stderr)
    )
    parents = [str(folder) for folder in folders]

    results = {}
    for name, flags in (
        ("vanilla", ["--method", "vanilla"]),
        ("ot", ["--alignment", "activations", "--solver", "emd", "--residual", "shared"]),
    ):
        out = workdir / f"fused-{name}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"$ otfuse fuse {' '.join(parents)} --out {out} {' '.join(flags)}", file=sys.stderr)
        _otfuse("fuse", *parents, "--out", str(out), "--data", str(calib), *flags)
        results[name] = json.loads(_otfuse("eval", str(out), "--data", str(test)))
    for index, folder in enumerate(parents):
        results[f"parent-{index}"] = json.loads(_otfuse("eval", folder, "--data", str(test)))

    print(f"\n{'model':<12} {'accuracy':>9} {'loss':>8}")
    for name in ("parent-0", "parent-1", "vanilla", "ot"):
        print(f"{name:<12} {results[name]['accuracy']:>9.4f} {results[name]['loss']:>8.3f}")
    print(
        f"\nfused checkpoint: {workdir / 'fused-ot'} (model card: README.md, recipe: fusion.json)"
    )
    (workdir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
