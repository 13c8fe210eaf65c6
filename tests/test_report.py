"""Artifacts: the CLI job writes the model, metrics.json, transport_maps.safetensors and a
self-contained report.html whose inlined plots are real PNGs."""

import base64
import json
import re

import transformers
from factories import image_data, save, tiny_vit
from safetensors import safe_open

from fusion_core.metrics import KINDS, SCHEMA_VERSION
from fusion_core.report import plots, write_report
from otfuse.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def _images(html: str) -> dict[str, bytes]:
    found = re.findall(r"id='plot-(\w+)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    return {name: base64.b64decode(data) for name, data in found}


def test_cli_job_writes_every_artifact(tmp_path):
    models = [save(tiny_vit(seed=s), tmp_path / f"m{s}") for s in (1, 2)]
    calib = image_data(tmp_path / "calib.safetensors", seed=5)
    test = image_data(tmp_path / "test.safetensors", seed=6)
    train = image_data(tmp_path / "train.safetensors", count=32, seed=7)
    out = tmp_path / "out"
    code = main(
        [
            "fuse",
            *map(str, models),
            "--out",
            str(out),
            "--alignment",
            "activations",
            "--residual",
            "shared",
            "--data",
            str(calib),
            "--reg",
            "emd,0.05",
            "--anchor",
            "0",
            "--search-budget",
            "3",
            "--eval-data",
            str(test),
            "--calib-data",
            str(calib),
            "--finetune-data",
            str(train),
            "--finetune-steps",
            "3",
            "--finetune-baselines",
            "vanilla",
            "--lr",
            "1e-3",
            "--batch-size",
            "8",
            "--save-transport-maps",
            "--report",
            "--quiet",
        ]
    )
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert names >= {
        "config.json",
        "model.safetensors",
        "README.md",
        "fusion.json",
        "metrics.json",
        "report.html",
        "transport_maps.safetensors",
    }
    transformers.ViTForImageClassification.from_pretrained(str(out))

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["schema_version"] == SCHEMA_VERSION and metrics["task"] == "classification"
    assert metrics["published"] == "fused+finetune"
    kinds = [r["kind"] for r in metrics["evaluation"]]
    assert kinds == ["parent", "parent", *KINDS[1:]]
    assert all(0 <= r["metrics"]["accuracy"] <= 1 for r in metrics["evaluation"])
    # --calib-data makes it a recipe search; the flags given pin their axes
    points = metrics["sweep"]["points"]
    assert metrics["sweep"]["mode"] == "auto" and len(points) == 3
    assert [p["solver"] for p in points] == ["emd", "emd", "sinkhorn"]
    assert {(p["anchor"], p["alignment"], p["residual"]) for p in points} == {
        (0, "activations", "shared")
    }
    assert {p["heads"] for p in points} == {"matched", "cross"}
    assert [r["model"] for r in metrics["finetune"]["runs"]] == ["fused", "vanilla"]
    assert all(r["steps"] == 3 and r["before"] and r["after"] for r in metrics["finetune"]["runs"])
    assert metrics["artifacts"]["report"] == "report.html"
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "## Finetune" in card

    with safe_open(str(out / "transport_maps.safetensors"), "pt") as maps:
        keys = list(maps.keys())
        assert keys and all(k.startswith("model1/") for k in keys)
        plan = maps.get_tensor(keys[0])
        assert abs(float(plan.sum()) - 1.0) < 1e-4
        metadata = maps.metadata()
        assert metadata["format"] == "otfuse-transport-maps"
    diagnostics = metrics["plans"]
    assert {f"model{d['model']}/{d['space']}" for d in diagnostics} == set(keys) | set(
        json.loads(metadata["aliases"])
    )
    for d in diagnostics:
        assert 0 <= d["entropy_ratio"] <= 1 and 0 <= d["distance_from_permutation"] <= 1
        if metrics["sweep"]["chosen"]["solver"] == "emd":
            assert d["distance_from_permutation"] < 1e-6  # EMD plans are permutations here

    html = (out / "report.html").read_text()
    images = _images(html)
    assert set(images) == {"baselines", "sweep", "finetune", "transport_maps"}
    for png in images.values():
        assert png.startswith(PNG) and len(png) > 2000
    assert "src='http" not in html and "<script" not in html  # self-contained, static


def test_mlm_document_plots(tmp_path):
    document = {
        "task": "masked-lm",
        "primary_metric": "loss",
        "models": ["a", "b"],
        "anchor": 0,
        "published": "fused",
        "data": {"eval": "e"},
        "evaluation": [
            {"name": "parent 0", "kind": "parent", "metrics": {"loss": 2.0, "perplexity": 7.4}},
            {"name": "ensemble", "kind": "ensemble", "metrics": {"loss": 1.8, "perplexity": 6.0}},
            {"name": "vanilla", "kind": "vanilla", "metrics": {}, "skipped": "widths differ"},
            {"name": "fused", "kind": "fused", "metrics": {"loss": 2.2, "perplexity": 9.0}},
        ],
        "sweep": {
            "selected_on": "c",
            "metric": "loss",
            "chosen": {"solver": "sinkhorn", "reg": 0.1},
            "points": [
                {
                    "solver": "sinkhorn",
                    "reg": r,
                    "calib": {"loss": 3 - r},
                    "seconds": 1.0,
                    "chosen": r == 0.1,
                }
                for r in (0.01, 0.1)
            ],
        },
        "finetune": None,
        "plans": [],
    }
    made = plots(document)
    assert set(made) == {"baselines", "sweep"} and all(p.startswith(PNG) for p in made.values())
    html = write_report(document, tmp_path / "r.html").read_text()
    assert "skipped: widths differ" in html and len(_images(html)) == 2
