"""Exactness by construction: a model fused with neuron- and head-permuted copies of itself
(same function) must give the original function back under hard alignment."""

import pytest
import torch
import transformers
from factories import DEVICE, image_data, permuted_copy, save, text_data, tiny_bert, tiny_vit
from safetensors.torch import load_file

from fusion_core import FusionSpec, fuse

CASES = [
    ("BertForSequenceClassification", tiny_bert, text_data),
    ("BertForMaskedLM", tiny_bert, text_data),
    ("BertModel", tiny_bert, text_data),
    ("ViTForImageClassification", tiny_vit, image_data),
    ("ViTModel", tiny_vit, image_data),
]


def _outputs(model, data_file):
    batch = {k: v for k, v in load_file(str(data_file)).items() if k != "labels"}
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("architecture,make,make_data", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize(
    "alignment,residual,heads",
    [
        ("weights", "average", "matched"),
        ("activations", "average", "cross"),
        ("weights", "shared", "cross"),
        ("activations", "shared", "matched"),
    ],
)
def test_permuted_copies_fuse_back_to_the_original(
    tmp_path, architecture, make, make_data, copies, alignment, residual, heads
):
    original = make(architecture, layers=2, seed=3)
    folders = [save(original, tmp_path / "original")]
    for k in range(copies):
        copy = permuted_copy(original, seed=10 + k)
        folders.append(save(copy, tmp_path / f"copy{k}"))
    data = make_data(tmp_path / "data.safetensors")
    moved = [
        k for k, v in copy.state_dict().items() if not torch.equal(v, original.state_dict()[k])
    ]
    assert len(moved) > 10  # the copy really is permuted

    out = tmp_path / "fused"
    spec = FusionSpec(
        device=DEVICE, solver="emd", alignment=alignment, residual=residual, heads=heads
    )
    fuse(folders, out, spec, data=data)
    fused = getattr(transformers, architecture).from_pretrained(str(out)).eval()
    torch.testing.assert_close(
        _outputs(fused, data), _outputs(original, data), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("anchor", [0, 1])
def test_permuted_anchor_gives_the_permuted_function(tmp_path, anchor):
    """With a permuted copy as anchor, the fused model is that copy (same outputs)."""
    original = tiny_vit(seed=4)
    copy = permuted_copy(original, seed=5)
    folders = [save(original, tmp_path / "a"), save(copy, tmp_path / "b")]
    data = image_data(tmp_path / "data.safetensors")
    out = tmp_path / "fused"
    fuse(
        folders,
        out,
        FusionSpec(
            device=DEVICE, solver="emd", anchor=anchor, qk="free", residual="weighted-matrix"
        ),
        data=data,
    )
    fused = transformers.ViTForImageClassification.from_pretrained(str(out)).eval()
    torch.testing.assert_close(
        _outputs(fused, data), _outputs(original, data), atol=1e-4, rtol=1e-4
    )
    fused_state = load_file(str(out / "model.safetensors"))
    anchor_state = load_file(str(folders[anchor] / "model.safetensors"))
    for key, tensor in anchor_state.items():
        torch.testing.assert_close(fused_state[key], tensor, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alignment", ["weights", "activations"])
def test_shared_stream_keeps_an_aligned_model_s_function(tmp_path, alignment):
    """With one plan for the residual stream and heads matched one-to-one, a hard-aligned
    independent model (weight 1, anchor weight 0) computes exactly what it computed before:
    every piece of the flow graph is consistent, not only on permuted copies."""
    anchor, other = tiny_vit(seed=1), tiny_vit(seed=2)
    folders = [save(anchor, tmp_path / "a"), save(other, tmp_path / "b")]
    data = image_data(tmp_path / "data.safetensors")
    out = tmp_path / "fused"
    spec = FusionSpec(
        device=DEVICE, solver="emd", alignment=alignment, residual="shared", weights=(0.0, 1.0)
    )
    fuse(folders, out, spec, data=data)
    fused = transformers.ViTForImageClassification.from_pretrained(str(out)).eval()
    torch.testing.assert_close(_outputs(fused, data), _outputs(other, data), atol=1e-4, rtol=1e-4)
