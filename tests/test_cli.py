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


def test_max_shard_size_takes_hugging_face_sizes_into_the_recipe():
    """--max-shard-size 2GB reaches the fusion's recipe; the spec's default is Hugging
    Face's 5GB, and a size in another notation or a bad one is read or refused by name."""
    from fusion_core.contract import fusion_spec, validate_job
    from otfuse.cli import _size_or_fail, build_parser, job_spec

    def recipe(*flags: str):
        args = build_parser().parse_args(["fuse", "a", "b", "--out", "c", *flags])
        return fusion_spec(validate_job(job_spec(args)), "cpu")

    assert recipe("--max-shard-size", "2GB").max_shard_size == 2 * 10**9
    assert recipe().max_shard_size == 5 * 10**9
    assert _size_or_fail("2GiB") == 2 << 30 and _size_or_fail("1500") == 1500
    assert _size_or_fail("1.5 mb") == 1_500_000
    for bad in ("5 parsecs", "-1GB", ""):
        try:
            _size_or_fail(bad)
        except Exception as error:  # argparse reports it as the flag's error
            assert "not a size" in str(error)
        else:
            raise AssertionError(bad)
