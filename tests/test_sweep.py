"""The regularizer sweep: parsing, activations collected once, and the planted best value
chosen on the calibration split, never on the eval split."""

import json

import pytest
import torch
from factories import image_data, permuted_copy, save, tiny_vit
from safetensors.torch import load_file, save_file

import fusion_core.activations
import fusion_core.api
import fusion_core.sweep
from fusion_core import FusionSpec, InputError
from fusion_core.api import prepare
from fusion_core.contract import AUTO_REGS, Point, parse_regs
from fusion_core.evaluate import load_eval_set
from fusion_core.job import fuse_job
from fusion_core.sweep import run_sweep


def test_parse_regs():
    assert parse_regs("auto") == [Point("emd")] + [Point("sinkhorn", r) for r in AUTO_REGS]
    assert parse_regs("0.01, emd,0.1") == [
        Point("sinkhorn", 0.01),
        Point("emd"),
        Point("sinkhorn", 0.1),
    ]
    assert parse_regs(0.05) == [Point("sinkhorn", 0.05)]
    assert parse_regs([0.05, "emd", 0.05]) == [Point("sinkhorn", 0.05), Point("emd")]
    assert list(AUTO_REGS) == sorted(AUTO_REGS) and AUTO_REGS[0] == 0.01 and AUTO_REGS[-1] == 0.3
    for bad in ("0", "-1,0.1", "x", "", "nan"):
        with pytest.raises(InputError) as error:
            parse_regs(bad)
        assert error.value.field.startswith("regularizer")


@pytest.fixture
def pair(tmp_path):
    folders = [save(tiny_vit(seed=s), tmp_path / f"m{s}") for s in (1, 2)]
    return {
        "models": folders,
        "calib": image_data(tmp_path / "calib.safetensors", seed=5),
        "eval": image_data(tmp_path / "eval.safetensors", seed=6),
    }


def test_planted_best_is_chosen_on_calibration_not_eval(pair, tmp_path, monkeypatch):
    """A scorer planted per (split, reg): calibration prefers 0.1, eval prefers 0.01. The
    job must publish the 0.1 fusion and still report the eval curve; activations are
    collected once for the whole sweep."""
    planted = {"calib": {0.01: 0.5, 0.1: 0.9, 0.3: 0.7}, "eval": {0.01: 0.95, 0.1: 0.6, 0.3: 0.4}}

    def score(folder, data):
        reg = json.loads((folder / "fusion.json").read_text())["spec"]["reg"]
        split = "calib" if data.path == pair["calib"] else "eval"
        return {"accuracy": planted[split][reg], "loss": 1.0, "examples": 24}

    collected = []
    real_collect = fusion_core.api.collect

    def counting_collect(parent, *args, **kwargs):
        collected.append(parent.index)
        return real_collect(parent, *args, **kwargs)

    monkeypatch.setattr(
        fusion_core.sweep,
        "_score",
        lambda folder, data, device, cancelled=None: score(folder, data),
    )
    monkeypatch.setattr(fusion_core.api, "collect", counting_collect)
    out = tmp_path / "out"
    result = fuse_job(
        pair["models"],
        out,
        FusionSpec(alignment="activations", solver="sinkhorn"),
        regs="0.01,0.1,0.3",
        data=pair["calib"],
        eval_data=pair["eval"],
        calib_data=pair["calib"],
    )
    assert sorted(collected) == [0, 1]  # once per model, not once per point
    sweep = result.metrics["sweep"]
    assert sweep["chosen"] == {"solver": "sinkhorn", "reg": 0.1}
    assert [p["chosen"] for p in sweep["points"]] == [False, True, False]
    assert [p["eval"]["accuracy"] for p in sweep["points"]] == [0.95, 0.6, 0.4]
    assert json.loads((out / "fusion.json").read_text())["spec"]["reg"] == 0.1
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["schema_version"] == 1 and on_disk["sweep"]["chosen"]["reg"] == 0.1
    fused = next(r for r in on_disk["evaluation"] if r["kind"] == "fused")
    assert fused["metrics"]["accuracy"] == 0.6 and fused["path"] == "."
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no leftovers


def test_real_planted_case_exact_alignment_wins(tmp_path):
    """A model and a permuted copy: EMD recovers the original function exactly (calibration
    accuracy 1 against the original's own predictions), a near-uniform Sinkhorn plan does
    not. No scorer is injected."""
    original = tiny_vit(seed=3)
    folders = [
        save(original, tmp_path / "a"),
        save(permuted_copy(original, seed=11), tmp_path / "b"),
    ]
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(40, 1, 8, 8, generator=gen)
    with torch.no_grad():
        labels = original(pixel_values=pixels).logits.argmax(-1)
    calib = tmp_path / "calib.safetensors"
    save_file({"pixel_values": pixels, "labels": labels}, str(calib))
    prepared = prepare(folders, FusionSpec(residual="shared"))
    work = tmp_path / "work"
    work.mkdir()
    result = run_sweep(
        prepared,
        [Point("sinkhorn", 5.0), Point("emd"), Point("sinkhorn", 1.0)],
        work,
        load_eval_set(folders[0], calib),
    )
    assert result.chosen == 1 and result.points[1].calib["accuracy"] == 1.0
    assert result.points[0].calib["loss"] > result.points[1].calib["loss"]
    assert [p.name for p in work.iterdir()] == [result.folder.name]  # losers deleted
    fused = load_file(str(result.folder / "model.safetensors"))
    assert fused.keys() == load_file(str(folders[0] / "model.safetensors")).keys()


def test_sweep_refuses_to_choose_on_the_eval_data(pair, tmp_path):
    with pytest.raises(InputError, match=r"must not be data\.eval") as error:
        fuse_job(
            pair["models"],
            tmp_path / "out",
            regs="0.01,0.1",
            eval_data=pair["eval"],
            calib_data=pair["eval"],
        )
    assert error.value.field == "data.calibration"
    with pytest.raises(InputError, match="calib"):
        fuse_job(pair["models"], tmp_path / "out", regs="auto", eval_data=pair["eval"])
    assert not (tmp_path / "out").exists()


def test_mlm_sweep_is_chosen_by_calibration_loss(tmp_path):
    from factories import text_data, tiny_bert

    models = [
        save(tiny_bert("BertForMaskedLM", seed=s, mask_token_id=4), tmp_path / f"m{s}")
        for s in (1, 2)
    ]
    calib = text_data(tmp_path / "calib.safetensors", seed=1, labels=False)
    test = text_data(tmp_path / "test.safetensors", seed=2, labels=False)
    progress = []
    result = fuse_job(
        models,
        tmp_path / "out",
        regs="0.05,1.0",
        eval_data=test,
        calib_data=calib,
        progress=lambda p: progress.append(p.detail),
    )
    metrics = result.metrics
    assert metrics["task"] == "masked-lm" and metrics["sweep"]["metric"] == "loss"
    losses = [p["calib"]["loss"] for p in metrics["sweep"]["points"]]
    chosen = [p["chosen"] for p in metrics["sweep"]["points"]]
    assert chosen[losses.index(min(losses))] is True
    rows = {r["name"]: r for r in metrics["evaluation"]}
    assert set(rows) == {"parent 0", "parent 1", "ensemble", "vanilla", "fused"}
    assert all(r["metrics"]["perplexity"] > 1 for r in rows.values())
    assert any(d.startswith("sweep 2/2 (sinkhorn reg=1): ") for d in progress)
