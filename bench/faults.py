"""Fault injection, repeated: every scenario of tests/faults/ N times on one real stack
(Redis with AOF, S3 over HTTP behind a fault proxy, a Celery worker, the API), one table.

    python bench/faults.py --repeat 5

A job passes when it ended exactly once with one complete set of artifacts (succeeded) or
with nothing under its output prefix (failed), and nothing was left in the temporary prefix.
The figures in docs/reliability.md come from this script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "faults"), str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from factories import image_data, save, tiny_vit  # noqa: E402
from lab import Lab  # noqa: E402
from scenarios import (  # noqa: E402
    KILL_STAGES,
    api_restarted,
    redis_restarted,
    s3_failing,
    worker_killed,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each scenario")
    args = parser.parse_args()
    import logging

    import transformers

    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    root = Path(tempfile.mkdtemp(prefix="otfuse-bench-faults-"))
    parents = {
        "root": root,
        "models": [save(tiny_vit(seed=s), root / f"vit-{s}") for s in (0, 1)],
        "data": image_data(root / "images.safetensors"),
    }
    lab = Lab(parents, root / "lab").start()
    rows: dict[str, list] = defaultdict(list)
    started = time.monotonic()
    try:
        for run in range(args.repeat):
            for stage in KILL_STAGES:
                outcome = worker_killed(lab, stage)
                rows[outcome.scenario].append(outcome)
            for outcome in redis_restarted(lab):
                rows[outcome.scenario].append(outcome)
            for mode, after in (("fail", 0), ("drop", 0), ("fail", 4)):
                outcome = s3_failing(lab, mode, after)
                rows[outcome.scenario].append(outcome)
            outcome = api_restarted(lab)
            rows[outcome.scenario].append(outcome)
            print(
                f"run {run + 1}/{args.repeat} done ({time.monotonic() - started:.0f}s)",
                file=sys.stderr,
            )
    finally:
        lab.close()

    header = (
        f"| {'scenario':<34} | jobs | succeeded once | failed cleanly | lost or doubled "
        f"| seconds to end (mean, max) |"
    )
    print(header)
    print("|" + "|".join("---" for _ in range(6)) + "|")
    for scenario, outcomes in rows.items():
        once = sum(o.status == "succeeded" and o.ok for o in outcomes)
        clean = sum(o.status == "failed" and o.ok for o in outcomes)
        bad = len(outcomes) - once - clean
        seconds = [o.seconds for o in outcomes]
        print(
            f"| {scenario:<34} | {len(outcomes):>4} | {once:>14} | {clean:>14} | {bad:>15} "
            f"| {statistics.mean(seconds):.1f}, {max(seconds):.1f} |"
        )
    print(f"\n{args.repeat} runs in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
