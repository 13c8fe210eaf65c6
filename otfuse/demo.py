"""`otfuse demo`: the main job end to end on one machine, with nothing to download.

Trains two small ViTs on scikit-learn's digits from different seeds (cached in the work
folder), fuses them with `otfuse fuse` (evaluating the parents, their ensemble, vanilla and
OT fusion on the test split) and checks the fused model with `otfuse eval`.
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

    out = workdir / "fused-ot"
    shutil.rmtree(out, ignore_errors=True)
    # no recipe flags: with calibration data the recipe (and the anchor) is searched
    flags = ["--calib-data", str(calib), "--eval-data", str(test)]
    print(f"$ otfuse fuse {' '.join(parents)} --out {out} {' '.join(flags)}", file=sys.stderr)
    _otfuse("fuse", *parents, "--out", str(out), *flags)
    print(f"$ otfuse eval {out} --data {test}", file=sys.stderr)
    fused = json.loads(_otfuse("eval", str(out), "--data", str(test)))

    # The job's table: each parent, their ensemble (two models' cost), vanilla and OT fusion.
    rows = json.loads((out / "metrics.json").read_text())["evaluation"]
    results = {row["name"]: row["metrics"] for row in rows if row["metrics"]}
    results["ot"] = fused
    print(f"\n{'model':<12} {'accuracy':>9} {'loss':>8}")
    for name in ("parent 0", "parent 1", "ensemble", "vanilla", "ot"):
        print(f"{name:<12} {results[name]['accuracy']:>9.4f} {results[name]['loss']:>8.3f}")
    print(f"\nfused checkpoint: {out} (model card: README.md, recipe: fusion.json)")
    (workdir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
