"""Models of different widths fuse into the anchor's shapes; the output loads and runs."""

import json

import pytest
import torch
import transformers
from factories import (
    DEVICE,
    image_data,
    save,
    text_data,
    tiny,
    tiny_bert,
    tiny_decoder,
    tiny_vit,
    widened_copy,
    widened_vit_copy,
)
from safetensors.torch import load_file

from fusion_core import FusionSpec, fuse
from fusion_core.transport import in_map, out_map


@pytest.mark.parametrize("alignment", ["weights", "activations"])
@pytest.mark.parametrize("residual", ["average", "shared"])
@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
@pytest.mark.parametrize("anchor_hidden,other_hidden", [(16, 24), (24, 16)])
def test_vit_of_another_width_fuses_into_the_anchor_shapes(
    tmp_path, alignment, residual, solver, anchor_hidden, other_hidden
):
    anchor = tiny_vit(hidden=anchor_hidden, intermediate=2 * anchor_hidden, seed=1)
    other = tiny_vit(hidden=other_hidden, intermediate=3 * other_hidden, seed=2)
    folders = [save(anchor, tmp_path / "a"), save(other, tmp_path / "b")]
    data = image_data(tmp_path / "d.safetensors")
    out = tmp_path / "fused"
    fuse(
        folders,
        out,
        FusionSpec(device=DEVICE, alignment=alignment, solver=solver, residual=residual),
        data=data,
    )
    fused = transformers.ViTForImageClassification.from_pretrained(str(out)).eval()
    assert fused.config.hidden_size == anchor_hidden
    for key, tensor in fused.state_dict().items():
        assert tensor.shape == anchor.state_dict()[key].shape, key
    logits = fused(pixel_values=load_file(str(data))["pixel_values"]).logits
    assert logits.shape == (24, 4) and bool(torch.isfinite(logits).all())


def test_bert_mlm_of_another_width(tmp_path):
    anchor = tiny_bert("BertForMaskedLM", hidden=16, intermediate=32, seed=1)
    other = tiny_bert("BertForMaskedLM", hidden=32, intermediate=48, seed=2)
    folders = [save(anchor, tmp_path / "a"), save(other, tmp_path / "b")]
    data = text_data(tmp_path / "d.safetensors", labels=False)
    fuse(folders, tmp_path / "fused", FusionSpec(device=DEVICE, alignment="activations"), data=data)
    fused = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "fused")).eval()
    batch = load_file(str(data))
    assert bool(torch.isfinite(fused(**batch).logits).all())


def test_masses_reconstruct_inputs_and_average_outputs():
    """Outputs: each anchor neuron gets one unit of mass. Inputs: each model neuron is fully
    reconstructed. A 48 <- 64 pair must not be scaled by 64/48."""
    plan = torch.rand(64, 48)
    plan = plan / plan.sum()
    ones = torch.ones(64)
    torch.testing.assert_close(ones @ out_map(plan), torch.ones(48))  # averages of ones stay one
    torch.testing.assert_close(in_map(plan) @ torch.ones(48), ones)  # each row reconstructs one


@pytest.mark.parametrize("alignment", ["weights", "activations"])
@pytest.mark.parametrize("residual", ["average", "shared"])
@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "GPT2LMHeadModel"])
def test_decoder_of_other_widths_fuses_into_the_anchor_shapes(
    tmp_path, alignment, residual, solver, architecture
):
    """Hidden and MLP widths differ; head counts (and, for rotary Llama, head_dim) are the
    anchor's. The written config is the anchor's and loads."""
    if architecture == "LlamaForCausalLM":
        anchor = tiny_decoder(hidden=16, intermediate=32, head_dim=4, seed=1)
        other = tiny_decoder(hidden=24, intermediate=40, head_dim=4, seed=2)
    else:  # GPT-2's head_dim is hidden / heads: 8 against 12, aligned inside heads
        anchor = tiny(architecture, hidden=16, intermediate=32, seed=1)
        other = tiny(architecture, hidden=24, intermediate=56, seed=2)
    folders = [save(anchor, tmp_path / "a"), save(other, tmp_path / "b")]
    data = text_data(tmp_path / "d.safetensors", labels=False)
    out = tmp_path / "fused"
    spec = FusionSpec(device=DEVICE, alignment=alignment, solver=solver, residual=residual)
    fuse(folders, out, spec, data=data)
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (folders[0] / "config.json").read_text()
    )
    fused = getattr(transformers, architecture).from_pretrained(str(out)).eval()
    for key, tensor in fused.state_dict().items():
        assert tensor.shape == anchor.state_dict()[key].shape, key
    batch = load_file(str(data))
    assert bool(torch.isfinite(fused(**batch).logits).all())


@pytest.mark.parametrize("residual", ["shared", "average"])
def test_a_neuron_duplicated_wide_llama_fuses_into_the_narrow_function(tmp_path, residual):
    """By function, not only by shape: a wide model that is a neuron-duplicated copy of the
    narrow anchor (hidden 32 <- 16, MLP 64 <- 32) computes the anchor's function, and so
    must their fusion: each anchor neuron averages its two copies (outputs), and each copy is
    reconstructed from it (inputs), with no 2x scaling anywhere."""
    narrow = tiny_decoder(hidden=16, intermediate=32, head_dim=4, seed=1)
    wide = widened_copy(narrow)
    data = text_data(tmp_path / "d.safetensors", labels=False)
    batch = load_file(str(data))
    with torch.no_grad():
        expected = narrow(**batch).logits
        torch.testing.assert_close(wide(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    folders = [save(narrow, tmp_path / "narrow"), save(wide, tmp_path / "wide")]
    spec = FusionSpec(device=DEVICE, solver="emd", alignment="activations", residual=residual)
    fuse(folders, tmp_path / "fused", spec, data=data)
    fused = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "fused")).eval()
    with torch.no_grad():
        got = fused(**batch).logits
    assert float((got - expected).norm() / expected.norm()) < 1e-4


@pytest.mark.parametrize(
    "alignment,residual",
    [("activations", "shared"), ("weights", "shared"), ("activations", "average")],
)
def test_a_neuron_duplicated_wide_vit_fuses_into_the_narrow_function(tmp_path, alignment, residual):
    """The narrow anchor (hidden 16, MLP 32, 2 heads) and a wide copy of it (every neuron
    duplicated, consuming weights halved, head_dim doubled) compute one function, and so
    must their fusion under the `rms` convention: the RMS-preserving scale is exactly 1 for
    copies of one neuron, and the attention temperature makes up for the head_dim."""
    narrow = tiny_vit(hidden=16, intermediate=32, heads=2, seed=1)
    wide = widened_vit_copy(narrow)
    data = image_data(tmp_path / "d.safetensors")
    pixels = load_file(str(data))["pixel_values"]
    with torch.no_grad():
        expected = narrow(pixel_values=pixels).logits
        torch.testing.assert_close(wide(pixel_values=pixels).logits, expected, atol=1e-5, rtol=1e-5)
    folders = [save(narrow, tmp_path / "narrow"), save(wide, tmp_path / "wide")]
    spec = FusionSpec(
        device=DEVICE,
        solver="emd",
        alignment=alignment,
        residual=residual,
        heads="cross",
        rectangular="rms",
    )
    fuse(folders, tmp_path / "fused", spec, data=data)
    fused = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "fused"))
    with torch.no_grad():
        got = fused.eval()(pixel_values=pixels).logits
    assert float((got - expected).norm() / expected.norm()) < 1e-4
