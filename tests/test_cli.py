"""The CLI contract others rely on: flags, JSON output of eval, progress on stderr."""

import json
import subprocess
import sys

from factories import image_data, save, tiny_vit


def test_fuse_then_eval_through_the_console_script(tmp_path):
    folders = [save(tiny_vit(seed=s, layers=3), tmp_path / f"m{s}") for s in (1, 2, 3)]
    data = image_data(tmp_path / "d.safetensors")
    out = tmp_path / "fused"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "otfuse",
            "fuse",
            *map(str, folders),
            "--out",
            str(out),
            "--alignment",
            "activations",
            "--data",
            str(data),
            "--solver",
            "emd",
            "--anchor",
            "1",
            "--weights",
            "1",
            "2",
            "1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "aligning layer 3/3" in done.stderr and "activations of model 3/3" in done.stderr
    evaluated = subprocess.run(
        [sys.executable, "-m", "otfuse", "eval", str(out), "--data", str(data)],
        capture_output=True,
        text=True,
        check=True,
    )
    metrics = json.loads(evaluated.stdout)
    assert set(metrics) >= {"accuracy", "loss"} and 0 <= metrics["accuracy"] <= 1
