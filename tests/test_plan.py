"""`otfuse plan` from headers alone: the fused shapes are the anchor's, the map graph is the
engine's (shared stream, tied Q/K, derived attention output, merges), incompatible models are
refused with the fusion's own reasons, and the cost model's structure holds (a streaming
engine's peak does not grow with depth)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
from factories import save, tiny_bert, tiny_decoder, tiny_vit, widened_copy
from helpers import REPO
from safetensors import safe_open

from fusion_core.errors import InputError
from fusion_core.plan import local_plan
from fusion_core.plan_costs import CURRENT, STREAMING, CostModel
from fusion_core.spec import FusionSpec
from otfuse.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    llama = tiny_decoder(hidden=16, intermediate=32)
    made = {
        "bert0": tiny_bert(seed=0),
        "bert1": tiny_bert(seed=1),
        "bert-wide": tiny_bert(seed=2, intermediate=48),
        "bert-deep": tiny_bert(seed=3, layers=3),
        "vit": tiny_vit(),
        "llama0": llama,
        "llama1": tiny_decoder(hidden=16, intermediate=32, seed=1),
        "llama-wide": widened_copy(llama),
    }
    return {name: str(save(model, root / name)) for name, model in made.items()}


def _shapes(folder: str) -> dict[str, list[int]]:
    with safe_open(f"{folder}/model.safetensors", "pt") as handle:
        return {k: list(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118


def test_fused_shapes_are_the_anchor_s(folders):
    pair = [folders["bert0"], folders["bert-wide"]]
    for anchor in (0, 1):
        report = local_plan(pair, FusionSpec(anchor=anchor))
        assert report.compatible, report.problem
        assert report.fused["shapes"] == _shapes(pair[anchor])
        assert report.fused["parameters"] == sum(
            math.prod(s) for s in _shapes(pair[anchor]).values()
        )
    assert any("intermediate_size 32 (anchor 48)" in d for d in report.differences)
    report = local_plan(pair, FusionSpec())
    assert any("intermediate_size 48 (anchor 32)" in d for d in report.differences)
    mlp = next(s for s in report.spaces if s.name == "mlp.0")
    assert mlp.widths == [32, 48]
    assert next(m for m in report.maps if m.name == "mlp.0").shapes == [(48, 32)]


def test_the_map_graph_of_a_post_norm_encoder(folders):
    report = local_plan([folders["bert0"], folders["bert1"]], FusionSpec())
    spaces = {s.name: s for s in report.spaces}
    assert spaces["q.1"].map == spaces["k.1"].map == "q.1+k.1"  # tied Q/K: one map
    assert spaces["v.1"].map == "v.1"
    assert spaces["att.1"].defined_by.startswith("from v.1")  # derived from the value map
    assert spaces["mid.1"].defined_by == "merge: res.1 + ao.1 (average)"
    assert "encoder.layer.1.attention.self.query.weight" in spaces["res.1"].read_by
    assert "encoder.layer.1.attention.output.dense.weight" in spaces["att.1"].read_by
    maps = {m.name: m for m in report.maps}
    assert maps["att.1"].how == "derived" and maps["mid.1"].how == "merge"
    assert maps["res.0"].how == "ot"
    first, last = maps["mlp.0"].live
    assert first < last  # from the layer defining it to the one reading it

    shared = local_plan([folders["bert0"], folders["bert1"]], FusionSpec(residual="shared"))
    stream = {s.name for s in shared.spaces if s.map == "stream"}
    assert {"res.0", "mid.0", "ao.0", "mo.0", "res.2"} <= stream
    assert "mlp.0" not in stream
    assert sum(1 for m in shared.maps if m.name == "stream") == 1

    vanilla = local_plan([folders["bert0"], folders["bert1"]], FusionSpec(method="vanilla"))
    assert vanilla.maps == [] and all(s.map == s.name for s in vanilla.spaces)


def test_the_map_graph_of_rotary_grouped_query_attention(folders):
    report = local_plan([folders["llama0"], folders["llama-wide"]], FusionSpec())
    assert report.compatible, report.problem
    spaces = {s.name: s for s in report.spaces}
    # rotary: Q and K heads move whole, each with its own plan (query vs key/value heads)
    assert spaces["q.0"].map == "q.0" and spaces["k.0"].map == "k.0"
    assert spaces["k.0"].widths == [8, 8] and spaces["q.0"].widths == [16, 16]
    assert spaces["res.0"].widths == [16, 32] and spaces["mlp.1"].widths == [32, 64]
    assert report.fused["shapes"] == _shapes(folders["llama0"])


@pytest.mark.parametrize(
    "pair,spec,field,words",
    [
        (("bert0", "bert-deep"), FusionSpec(), None, "3 layers"),
        (("bert0", "vit"), FusionSpec(), None, "is a vit model"),
        (("llama0", "llama1"), FusionSpec(heads="cross"), "policy.heads", "rotary"),
        (("llama0", "llama1"), FusionSpec(qk="free"), "policy.qk", "rotary"),
        (("bert0", "bert-wide"), FusionSpec(method="vanilla"), "method", "equal widths"),
    ],
)
def test_incompatible_models_say_why(folders, pair, spec, field, words):
    report = local_plan([folders[name] for name in pair], spec)
    assert not report.compatible and report.estimate is None
    assert report.field == field and words in report.problem, report.problem
    json.dumps(report.to_dict())


def test_an_unreadable_model_is_an_input_error_at_its_place(folders, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(f"{folders['bert0']}/config.json", broken / "config.json")
    (broken / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(InputError) as caught:
        local_plan([folders["bert0"], str(broken)], FusionSpec())
    assert caught.value.field == "models.1"


def test_a_streaming_engine_s_peak_does_not_grow_with_depth(tmp_path):
    """The cost model's structure: the in-memory engine holds every plan and the whole
    output, so its peak grows with depth; the streaming engine's does not, and its time grows
    with depth."""
    streaming = CostModel(engine=STREAMING)
    in_memory = CostModel(engine=CURRENT)
    assert CostModel().engine is STREAMING  # the engine fusion_core runs
    estimates = {}
    for layers in (2, 6):
        models = [tiny_bert(seed=s, layers=layers, hidden=64, intermediate=256) for s in (0, 1)]
        folders = [str(save(m, tmp_path / f"{layers}-{i}")) for i, m in enumerate(models)]
        for name, costs in (("current", in_memory), ("streaming", streaming)):
            estimates[name, layers] = local_plan(folders, FusionSpec(), costs=costs).estimate
    assert estimates["streaming", 6].host_peak_bytes == estimates["streaming", 2].host_peak_bytes
    assert estimates["current", 6].host_peak_bytes > estimates["current", 2].host_peak_bytes
    walk = {k: e.seconds - e.time["prepare"] for k, e in estimates.items()}  # less the fixed
    assert walk["streaming", 6] > 2 * walk["streaming", 2]
    cuda = local_plan(folders, FusionSpec(device="cuda")).estimate
    assert cuda.device_peak_bytes and cuda.device_peak_bytes > 0


def test_plan_on_the_command_line(folders):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "otfuse", "plan", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )

    done = run(folders["llama0"], folders["llama1"], "--residual", "shared", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["compatible"] and report["estimate"]["host_peak_bytes"] > 0
    assert report["spec"]["residual"] == "shared"

    done = run(folders["bert0"], folders["bert1"], "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "compatible." in done.stdout and "q.{i}+k.{i}" in done.stdout
    assert "peak host memory" in done.stdout

    done = run(folders["llama0"], folders["llama1"], "--heads", "cross")
    assert done.returncode == 3 and "NOT compatible: policy.heads: llama uses rotary" in done.stdout


def test_plan_flag_errors_name_the_flag(folders, capsys):
    assert main(["plan", folders["bert0"], folders["bert1"], "--reg", "0"]) == 3
    assert "--reg" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change",
    [
        {"num_hidden_layers": "two"},
        {"num_hidden_layers": 10**9},
        {"architectures": 5},
        {"model_type": "t5"},
        {"num_attention_heads": None},
    ],
)
def test_a_hostile_config_is_an_input_error_at_its_model(folders, tmp_path, change):
    bad = tmp_path / "bad"
    shutil.copytree(folders["bert1"], bad)
    config = json.loads((bad / "config.json").read_text()) | change
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as caught:
        local_plan([folders["bert0"], str(bad)], FusionSpec())
    assert caught.value.field == "models.1", caught.value


def test_a_search_is_planned_in_memory_and_one_recipe_streaming(folders):
    """A job with several candidates holds each in memory to score it (the fused model and a
    live copy): its plan says so and needs more than the same recipe streamed alone."""
    pair = [folders["llama0"], folders["llama1"]]
    alone = local_plan(pair, FusionSpec()).estimate
    searched = local_plan(pair, FusionSpec(), fusions=8).estimate
    assert alone.engine == STREAMING.name
    assert searched.engine != STREAMING.name and "search" in searched.engine
    assert searched.host_peak_bytes > alone.host_peak_bytes


def test_activation_collection_is_its_own_phase_of_the_peak(tmp_path):
    """Collecting activations holds the streamed model's weights (its largest module and the
    resident cache, or the whole model when it fits that) and a batch's forward pass; a
    weights-based plan has no such phase."""
    from fusion_core.plan import LocalFolder, plan

    peaks, sizes = {}, {}
    for layers in (2, 6):
        folder = save(tiny_decoder(layers=layers, seed=1), tmp_path / f"d{layers}")
        sizes[layers] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        models = [LocalFolder(folder), LocalFolder(folder)]
        spec = FusionSpec(alignment="activations", samples=64)
        peaks[layers] = plan(models, spec, data_tokens=64 * 16).estimate.collection_peak_bytes
        assert plan(models, FusionSpec()).estimate.collection_peak_bytes is None
    base = CostModel().baseline_bytes + CostModel().transformers_bytes
    assert peaks[2] > base + sizes[2]  # the weights and a batch's forward pass
    # tiny models fit the resident cache whole: the weights held grow with them, the
    # forward pass (same widths, same batch) does not
    assert peaks[6] - peaks[2] == sizes[6] - sizes[2]


def test_exact_ot_on_a_gpu_plans_the_auction_for_large_problems(tmp_path, monkeypatch):
    """On CUDA, square problems of AUCTION_MIN_N neurons and more are solved by the auction
    (`assignment.assign`): the plan counts its rounds and its int64 costs there, and
    nothing changes on CPU."""
    import fusion_core.plan_costs as plan_costs

    models = [tiny_bert(seed=s, hidden=64, intermediate=256) for s in (0, 1)]
    folders = [str(save(m, tmp_path / str(i))) for i, m in enumerate(models)]
    on = {d: FusionSpec(device=d, solver="emd") for d in ("cpu", "cuda")}
    before = {d: local_plan(folders, spec).estimate for d, spec in on.items()}
    monkeypatch.setattr(plan_costs, "AUCTION_MIN_N", 256)  # the MLPs, not the 64-wide stream
    after = {d: local_plan(folders, spec).estimate for d, spec in on.items()}
    assert after["cpu"].seconds == before["cpu"].seconds
    assert after["cpu"].host_peak_bytes == before["cpu"].host_peak_bytes
    costs = CostModel()
    jv = costs.emd_seconds(256)
    auction = costs.auction_rounds_per_n * 256 * costs.cuda_seconds_per_round
    problems = (after["cuda"].time["solver"] - before["cuda"].time["solver"]) / (auction - jv)
    # (the estimate's parts are rounded to ms) the two MLPs, once a pass
    assert abs(problems - round(problems)) < 0.01 and round(problems) >= 2
    assert after["cuda"].device_peak_bytes >= before["cuda"].device_peak_bytes
