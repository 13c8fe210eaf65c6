"""Fusing a model with itself returns it, for every policy and both solvers."""

import pytest
import torch
from factories import DEVICE, image_data, save, text_data, tiny, tiny_bert, tiny_decoder, tiny_vit
from safetensors.torch import load_file

from fusion_core import FusionSpec, fuse

POLICIES = ["average", "weighted-scalar", "weighted-matrix", "identity", "shared"]
MODELS = {
    "bert": (tiny_bert, text_data),
    "vit": (tiny_vit, image_data),
    "gpt2": (lambda seed: tiny("GPT2LMHeadModel", seed=seed), text_data),
    "llama": (tiny_decoder, text_data),
}
OTHER_MODELS = {
    "roberta": lambda seed: tiny("RobertaForMaskedLM", seed=seed),
    "distilbert": lambda seed: tiny("DistilBertForSequenceClassification", seed=seed),
    "mistral": lambda seed: tiny_decoder("MistralForCausalLM", kv_heads=1, seed=seed),
    "qwen2": lambda seed: tiny_decoder("Qwen2ForCausalLM", head_dim=8, seed=seed),
}


@pytest.mark.parametrize("residual", POLICIES)
@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
@pytest.mark.parametrize("family", list(MODELS))
def test_self_fusion_is_identity(tmp_path, residual, solver, family):
    make, make_data = MODELS[family]
    _assert_self_fusion_is_identity(tmp_path, make(seed=1), make_data, solver, residual)


@pytest.mark.parametrize("family", list(OTHER_MODELS))
def test_self_fusion_of_the_other_families_is_identity(tmp_path, family):
    model = OTHER_MODELS[family](seed=1)
    _assert_self_fusion_is_identity(tmp_path, model, text_data, "sinkhorn", "weighted-matrix")


def _assert_self_fusion_is_identity(tmp_path, model, make_data, solver, residual):
    data = make_data(tmp_path / "d.safetensors")
    folder = save(model, tmp_path / "m")
    out = tmp_path / "fused"
    # Sinkhorn recovers the identity only when the regularizer is small next to the gap
    # between a neuron's zero self-distance and its distance to any other neuron.
    fuse(
        [folder, folder],
        out,
        FusionSpec(device=DEVICE, solver=solver, reg=0.002, residual=residual),
        data=data,
    )
    fused, original = (
        load_file(str(out / "model.safetensors")),
        load_file(str(folder / "model.safetensors")),
    )
    assert fused.keys() == original.keys()
    for key, tensor in original.items():
        torch.testing.assert_close(fused[key], tensor, atol=1e-4, rtol=1e-4, msg=key)


def test_vanilla_fusion_is_the_plain_average(tmp_path):
    a, b = tiny_bert(seed=1), tiny_bert(seed=2)
    folders = [save(a, tmp_path / "a"), save(b, tmp_path / "b")]
    out = tmp_path / "fused"
    fuse(folders, out, FusionSpec(device=DEVICE, method="vanilla", weights=(3.0, 1.0)))
    fused = load_file(str(out / "model.safetensors"))
    sa, sb = a.state_dict(), b.state_dict()
    for key, tensor in fused.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, 0.75 * sa[key] + 0.25 * sb[key], msg=key)


def test_vanilla_ignores_the_shared_stream_policy(tmp_path):
    a, b = tiny_vit(seed=1), tiny_vit(seed=2)
    folders = [save(a, tmp_path / "a"), save(b, tmp_path / "b")]
    fuse(folders, tmp_path / "out", FusionSpec(device=DEVICE, method="vanilla", residual="shared"))
    fused = load_file(str(tmp_path / "out" / "model.safetensors"))
    key = next(k for k in fused if k.endswith("layernorm.weight"))
    assert fused[key].shape == a.state_dict()["vit.layernorm.weight"].shape


def test_shared_stream_records_each_plan_once(tmp_path):
    import json

    folders = [save(tiny_vit(seed=1), tmp_path / "a"), save(tiny_vit(seed=2), tmp_path / "b")]
    fuse(folders, tmp_path / "out", FusionSpec(device=DEVICE, residual="shared"))
    plans = json.loads((tmp_path / "out" / "fusion.json").read_text())["plans"]
    spaces = [p["space"] for p in plans]
    assert len(spaces) == len(set(spaces)) and "stream" in spaces
