"""The recipe search (the regularizer sweep is its special case): parsing, activations
collected once, the planted best recipe chosen on the calibration split and published, the
eval split never read during the search, budgets and pinned axes respected."""

import json

import pytest
import torch
from factories import image_data, permuted_copy, save, tiny_vit
from safetensors.torch import load_file, save_file

import fusion_core.api
import fusion_core.search
from fusion_core import FusionSpec, InputError, evaluate
from fusion_core.api import prepare
from fusion_core.contract import AUTO_REGS, Point, Recipe, SearchSpace, parse_regs
from fusion_core.evaluate import load_eval_set
from fusion_core.job import fuse_job
from fusion_core.search import write_chosen
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


PLANTED = Recipe(1, "activations", "shared", "cross", "sinkhorn", 0.055)


def planted_score(recipe, model, data):
    """Calibration: the planted recipe wins, its structure at other solver points comes
    next; every other recipe scores lower, in a fixed arbitrary order."""
    if recipe.structure == PLANTED.structure:
        accuracy = 0.9 if recipe == PLANTED else 0.8
    else:
        accuracy = 0.5 + 0.001 * (sum(map(ord, recipe.label)) % 97)
    return {"accuracy": accuracy, "loss": 1.0, "examples": 24}


def test_planted_recipe_is_chosen_on_calibration_and_published(pair, tmp_path, monkeypatch):
    """A scorer planted per recipe on the calibration data: the search finds the planted
    recipe (a non-default anchor, activations, shared, cross heads, a Sinkhorn point reached
    only by refining), publishes it with the reason and the runner-up, records every point,
    and collects activations once per model for all recipes."""
    seen = []

    def score(recipe, model, data, device, cancelled=None):
        seen.append(data.path)
        return planted_score(recipe, model, data)

    collected = []
    real_collect = fusion_core.api.collect

    def counting_collect(parent, *args, **kwargs):
        collected.append(parent.index)
        return real_collect(parent, *args, **kwargs)

    monkeypatch.setattr(fusion_core.search, "score_recipe", score)
    monkeypatch.setattr(fusion_core.api, "collect", counting_collect)
    events = []
    out = tmp_path / "out"
    spec = FusionSpec()
    result = fuse_job(
        pair["models"],
        out,
        spec,
        search=SearchSpace.auto(spec, budget=32),
        eval_data=pair["eval"],
        calib_data=pair["calib"],
        report=True,
        progress=events.append,
    )
    assert sorted(collected) == [0, 1]  # once per model, not once per recipe
    assert set(seen) == {pair["calib"]}
    sweep = result.metrics["sweep"]
    assert sweep["mode"] == "auto" and sweep["chosen"] == PLANTED.to_dict()
    points = sweep["points"]
    assert len(points) == 32 and sweep["stopped_by"] == "points"
    assert [p["chosen"] for p in points].count(True) == 1
    assert all(p["eval"] is None and p["seconds"] > 0 for p in points)  # eval takes no part
    # cheap first: the 24 structures at the screening point, weights before activations,
    # then refinement
    assert [p["phase"] for p in points] == ["screen"] * 24 + ["refine"] * 8
    assert all((p["solver"], p["reg"]) == ("sinkhorn", 0.023) for p in points[:24])
    assert [p["alignment"] for p in points[:24]] == ["weights"] * 12 + ["activations"] * 12
    assert {p["anchor"] for p in points} == {0, 1}
    assert sweep["runner_up"] and "runner-up" in sweep["reason"]
    record = json.loads((out / "fusion.json").read_text())
    assert record["search"]["chosen"] == PLANTED.to_dict()
    assert (
        record["search"]["calib"]["accuracy"] == 0.9
        and "best calibration" in (record["search"]["why"])
    )
    assert record["anchor"] == 1 and record["spec"]["heads"] == "cross"
    assert record["spec"]["reg"] == 0.055 and record["spec"]["residual"] == "shared"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["anchor"] == 1 and on_disk["sweep"]["chosen"] == PLANTED.to_dict()
    search = [e for e in events if e.stage == "search" and e.unit == "recipe"]
    assert [e.step for e in search[:3]] == [0, 1, 2] and search[0].total == 32
    assert "Recipe search" in (out / "report.html").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no leftovers


def test_the_search_never_reads_the_eval_data(tmp_path, monkeypatch):
    """A model and a permuted copy, calibration labels from the model: aligning them gives the
    model back (exactly under hard alignment, nearly at the screening point), so the search
    must find a recipe with calibration accuracy 1. Every evaluation during the search is on
    the calibration data; the eval data is only read after it. The published model scores on
    calibration what the search scored in memory."""
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
    test = image_data(tmp_path / "test.safetensors", seed=6)
    stage = ["setup"]
    scored = []
    real_scores = fusion_core.search.model_scores

    def recording(model, data, *args, **kwargs):
        scored.append((stage[0], data.path))
        return real_scores(model, data, *args, **kwargs)

    monkeypatch.setattr(fusion_core.search, "model_scores", recording)
    spec = FusionSpec()
    result = fuse_job(
        folders,
        tmp_path / "out",
        spec,
        search=SearchSpace.auto(spec, ["anchor"], budget=12),
        calib_data=calib,
        eval_data=test,
        progress=lambda e: stage.__setitem__(0, e.stage),
    )
    assert scored and {path for _, path in scored} == {calib}
    assert {s for s, _ in scored} == {"search"}
    sweep = result.metrics["sweep"]
    chosen = next(p for p in sweep["points"] if p["chosen"])
    assert chosen["calib"]["accuracy"] == 1.0
    assert len(sweep["points"]) == 12 and {p["anchor"] for p in sweep["points"]} == {0}
    published = evaluate(tmp_path / "out", calib)
    assert published["accuracy"] == 1.0
    assert abs(published["loss"] - chosen["calib"]["loss"]) < 1e-5  # in memory == on disk


def test_budget_and_pinned_axes(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(
        fusion_core.search,
        "score_recipe",
        lambda recipe, model, data, device, cancelled=None: planted_score(recipe, model, data),
    )
    spec = FusionSpec(solver="emd", heads="cross", anchor=1)
    space = SearchSpace.auto(spec, ["solver", "heads", "anchor"], budget=4)
    result = fuse_job(pair["models"], tmp_path / "o1", spec, search=space, calib_data=pair["calib"])
    points = result.metrics["sweep"]["points"]
    assert len(points) == 4 and result.metrics["sweep"]["stopped_by"] == "points"
    assert {(p["solver"], p["heads"], p["anchor"]) for p in points} == {("emd", "cross", 1)}
    # a seconds budget stops before the second recipe; the first always runs
    space = SearchSpace.auto(FusionSpec(), budget=32, seconds=1e-9)
    result = fuse_job(pair["models"], tmp_path / "o2", search=space, calib_data=pair["calib"])
    assert result.metrics["sweep"]["stopped_by"] == "seconds"
    record = json.loads((tmp_path / "o2" / "fusion.json").read_text())["search"]
    assert record["stopped_by"] == "seconds" and record["tried"] == 1


def test_rotary_models_skip_cross_heads(tmp_path):
    from factories import text_data, tiny_decoder

    models = [save(tiny_decoder(seed=s, hidden=16, layers=1), tmp_path / f"m{s}") for s in (1, 2)]
    calib = text_data(tmp_path / "calib.safetensors", seed=1, labels=False)
    spec = FusionSpec(solver="emd")
    space = SearchSpace.auto(spec, ["solver", "anchor", "alignment"], budget=8)
    result = fuse_job(models, tmp_path / "out", spec, search=space, calib_data=calib)
    sweep = result.metrics["sweep"]
    assert {p["heads"] for p in sweep["points"]} == {"matched"}
    assert len(sweep["points"]) == 3  # average, shared, weighted-scalar
    assert sweep["skipped"] and all("rotary" in s["reason"] for s in sweep["skipped"])


def test_real_planted_case_exact_alignment_wins(tmp_path):
    """A model and a permuted copy: EMD recovers the original function exactly (calibration
    accuracy 1 against the original's own predictions), a near-uniform Sinkhorn plan does
    not. No scorer is injected: the regularizer sweep is the search over solver points."""
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
    result = run_sweep(
        prepared,
        [Point("sinkhorn", 5.0), Point("emd"), Point("sinkhorn", 1.0)],
        load_eval_set(folders[0], calib),
    )
    # EMD is screened first, then the Sinkhorn points in the order given
    assert [(p.solver, p.reg) for p in result.points] == [
        ("emd", None),
        ("sinkhorn", 5.0),
        ("sinkhorn", 1.0),
    ]
    assert result.chosen == 0 and result.points[0].calib["accuracy"] == 1.0
    assert result.points[1].calib["loss"] > result.points[0].calib["loss"]
    out = tmp_path / "out"
    write_chosen(result, out, SearchSpace.fixed(prepared.spec), None)
    fused = load_file(str(out / "model.safetensors"))
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
    assert any(d.startswith("search recipe 2/2 (") and "sinkhorn reg=1)" in d for d in progress)


def test_one_recipe_is_not_held_in_memory_but_streamed_to_disk(pair, tmp_path):
    """With a single candidate there is nothing to score: the search holds no fused model,
    and the chosen recipe is fused straight to disk, the same tensors fuse() writes."""
    spec = FusionSpec(solver="emd")
    prepared = prepare(pair["models"], spec)
    result = run_sweep(prepared, [Point("emd")], None)
    assert result.fused is None and len(result.points) == 1
    out = tmp_path / "streamed"
    write_chosen(result, out, SearchSpace.fixed(prepared.spec, [Point("emd")]), None)
    reference = tmp_path / "reference"
    fusion_core.api.fuse(pair["models"], reference, spec)
    streamed = load_file(str(out / "model.safetensors"))
    expected = load_file(str(reference / "model.safetensors"))
    assert streamed.keys() == expected.keys()
    assert all(torch.equal(streamed[k], expected[k]) for k in expected)
    assert result.points[0].seconds > 0
