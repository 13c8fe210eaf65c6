"""Exactness by construction: a model fused with neuron- and head-permuted copies of itself
(same function) must give the original function back under hard alignment."""

import json
from functools import partial

import pytest
import torch
import transformers
from factories import (
    DEVICE,
    image_data,
    permuted_copy,
    save,
    text_data,
    tiny,
    tiny_bert,
    tiny_decoder,
    tiny_vit,
)
from safetensors.torch import load_file

from fusion_core import FusionSpec, assignment, fuse

lm_data = partial(text_data, labels=False)

# id -> (model factory taking a seed, data factory)
CASES = {
    "BertForSequenceClassification": (partial(tiny_bert), text_data),
    "BertForMaskedLM": (partial(tiny_bert, "BertForMaskedLM"), text_data),
    "BertModel": (partial(tiny_bert, "BertModel"), text_data),
    "ViTForImageClassification": (partial(tiny_vit), image_data),
    "ViTModel": (partial(tiny_vit, "ViTModel"), image_data),
    "RobertaForSequenceClassification": (
        partial(tiny, "RobertaForSequenceClassification"),
        text_data,
    ),
    "RobertaForMaskedLM": (partial(tiny, "RobertaForMaskedLM"), lm_data),
    "RobertaModel": (partial(tiny, "RobertaModel"), lm_data),
    "XLMRobertaForMaskedLM": (partial(tiny, "XLMRobertaForMaskedLM"), lm_data),
    "DistilBertForSequenceClassification": (
        partial(tiny, "DistilBertForSequenceClassification"),
        text_data,
    ),
    "DistilBertForMaskedLM": (partial(tiny, "DistilBertForMaskedLM"), lm_data),
    "DistilBertModel": (partial(tiny, "DistilBertModel"), lm_data),
    "GPT2LMHeadModel": (partial(tiny, "GPT2LMHeadModel"), lm_data),
    "GPT2Model": (partial(tiny, "GPT2Model"), lm_data),
    # 4 query heads in 2 key/value groups
    "LlamaForCausalLM": (partial(tiny_decoder), lm_data),
    "LlamaForCausalLM-tied": (partial(tiny_decoder, tie=True), lm_data),
    "LlamaModel": (partial(tiny_decoder, "LlamaModel"), lm_data),
    # multi-query: all 4 query heads read one key/value head
    "MistralForCausalLM": (partial(tiny_decoder, "MistralForCausalLM", kv_heads=1), lm_data),
    # no grouping, head_dim 8 with hidden 16 (head_dim from the config)
    "Qwen2ForCausalLM": (
        partial(tiny_decoder, "Qwen2ForCausalLM", kv_heads=4, head_dim=8),
        lm_data,
    ),
}
ROTARY = ("Llama", "Mistral", "Qwen2")
POLICIES = [
    ("weights", "average", "matched"),
    ("activations", "average", "cross"),
    ("weights", "shared", "cross"),
    ("activations", "shared", "matched"),
]


MANY_COPIES = {
    "BertForMaskedLM",
    "ViTForImageClassification",
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
}


def _params():
    """Every case under every policy with one copy, a few with two; rotary models only with
    matched heads (cross-head alignment is refused for them)."""
    for name, (make, make_data) in CASES.items():
        for alignment, residual, heads in POLICIES:
            heads = "matched" if name.startswith(ROTARY) else heads
            for copies in (1, 2) if name in MANY_COPIES else (1,):
                yield pytest.param(
                    make,
                    make_data,
                    copies,
                    alignment,
                    residual,
                    heads,
                    id=f"{name}-{alignment}-{residual}-{heads}-{copies}",
                )


def outputs(model, data_file):
    batch = {k: v for k, v in load_file(str(data_file)).items() if k != "labels"}
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_same_function(got: torch.Tensor, expected: torch.Tensor, tolerance=1e-4) -> None:
    relative = float((got - expected).norm() / expected.norm())
    assert relative < tolerance, f"relative difference {relative:.2e}"


def load_fused(folder):
    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    return getattr(transformers, architecture).from_pretrained(str(folder)).eval()


@pytest.mark.parametrize("make,make_data,copies,alignment,residual,heads", list(_params()))
def test_permuted_copies_fuse_back_to_the_original(
    tmp_path, make, make_data, copies, alignment, residual, heads
):
    original = make(layers=2, seed=3)
    folders = [save(original, tmp_path / "original")]
    for k in range(copies):
        copy = permuted_copy(original, seed=10 + k)
        folders.append(save(copy, tmp_path / f"copy{k}"))
    data = make_data(tmp_path / "data.safetensors")
    moved = [
        k for k, v in copy.state_dict().items() if not torch.equal(v, original.state_dict()[k])
    ]
    assert len(moved) > 10  # the copy really is permuted
    if original.base_model is not original:  # logits (a base model's states are permuted)
        assert_same_function(outputs(copy, data), outputs(original, data), 1e-5)

    out = tmp_path / "fused"
    spec = FusionSpec(
        device=DEVICE, solver="emd", alignment=alignment, residual=residual, heads=heads
    )
    fuse(folders, out, spec, data=data)
    assert_same_function(outputs(load_fused(out), data), outputs(original, data))


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
    torch.testing.assert_close(outputs(fused, data), outputs(original, data), atol=1e-4, rtol=1e-4)
    fused_state = load_file(str(out / "model.safetensors"))
    anchor_state = load_file(str(folders[anchor] / "model.safetensors"))
    for key, tensor in anchor_state.items():
        torch.testing.assert_close(fused_state[key], tensor, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_vit, partial(tiny_decoder, "Qwen2ForCausalLM")])
@pytest.mark.parametrize("alignment", ["weights", "activations"])
def test_shared_stream_keeps_an_aligned_model_s_function(tmp_path, make, alignment):
    """With one plan for the residual stream and heads matched one-to-one, a hard-aligned
    independent model (weight 1, anchor weight 0) computes exactly what it computed before:
    every piece of the flow graph is consistent, not only on permuted copies."""
    anchor, other = make(seed=1), make(seed=2)
    folders = [save(anchor, tmp_path / "a"), save(other, tmp_path / "b")]
    data = (image_data if make is tiny_vit else lm_data)(tmp_path / "data.safetensors")
    out = tmp_path / "fused"
    spec = FusionSpec(
        device=DEVICE, solver="emd", alignment=alignment, residual="shared", weights=(0.0, 1.0)
    )
    fuse(folders, out, spec, data=data)
    assert_same_function(outputs(load_fused(out), data), outputs(other, data))


def _inside_heads(state: dict, key: str, heads: int, head_dim: int, inside: torch.Tensor, axis=0):
    """Permute the dimensions inside every head of a projection's output axis alike."""
    order = (torch.arange(heads)[:, None] * head_dim + inside).flatten()
    state[key] = state[key].index_select(axis, order)


def test_permuting_qk_dims_inside_a_rotary_head_changes_the_function(tmp_path):
    """Why rotary Q/K heads move only whole: the same permutation of the dimensions inside
    every query and key head keeps q.k without rotary embeddings (GPT-2) and breaks it with
    them (Llama)."""
    data = lm_data(tmp_path / "data.safetensors")
    inside = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])  # swaps within pairs, never i <-> i + d/2
    llama = tiny_decoder(heads=2, kv_heads=2, hidden=16, seed=3)  # head_dim 8
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    for i in range(2):
        for name in ("q_proj", "k_proj"):
            _inside_heads(state, f"model.layers.{i}.self_attn.{name}.weight", 2, 8, inside)
    rotated = type(llama)(llama.config).eval()
    rotated.load_state_dict(state)
    relative = (outputs(rotated, data) - outputs(llama, data)).norm() / outputs(llama, data).norm()
    assert relative > 0.05, float(relative)

    gpt2 = tiny("GPT2LMHeadModel", heads=2, hidden=16, seed=3)
    state = {k: v.clone() for k, v in gpt2.state_dict().items()}
    for i in range(2):
        for part in (0, 1):  # Q and K, the first two thirds of c_attn's output axis
            key, order = f"transformer.h.{i}.attn.c_attn", torch.arange(48)
            order[part * 16 : (part + 1) * 16] = part * 16 + torch.cat([inside, 8 + inside])
            state[f"{key}.weight"] = state[f"{key}.weight"][:, order]
            state[f"{key}.bias"] = state[f"{key}.bias"][order]
    same = type(gpt2)(gpt2.config).eval()
    same.load_state_dict(state)
    assert_same_function(outputs(same, data), outputs(gpt2, data), 1e-5)


@pytest.mark.parametrize(
    "alignment,copy_dtype", [("weights", torch.bfloat16), ("activations", torch.float32)]
)
def test_bf16_parents_fuse_back_exactly_and_stay_bf16(tmp_path, alignment, copy_dtype):
    """A bf16 anchor and a bf16 or fp32 permuted copy of it (same values): computed in fp32,
    written in the anchor's bf16, bit for bit the original."""
    original = tiny_decoder(seed=3).to(torch.bfloat16)
    copy = permuted_copy(original, 7).to(copy_dtype)
    folders = [save(original, tmp_path / "a"), save(copy, tmp_path / "b")]
    data = lm_data(tmp_path / "data.safetensors")
    out = tmp_path / "fused"
    fuse(folders, out, FusionSpec(device=DEVICE, solver="emd", alignment=alignment), data=data)
    fused = load_file(str(out / "model.safetensors"))
    for key, tensor in load_file(str(folders[0] / "model.safetensors")).items():
        assert fused[key].dtype == torch.bfloat16, key
        assert torch.equal(fused[key], tensor), key  # a permutation of bf16 values, undone
    record = json.loads((out / "fusion.json").read_text())
    assert record["dtypes"] == {
        "parents": ["bfloat16", str(copy_dtype).removeprefix("torch.")],
        "compute": "float32",
        "written": "bfloat16",
    }


@pytest.mark.parametrize("case", ["BertForSequenceClassification", "LlamaForCausalLM"])
def test_the_auction_solver_fuses_permuted_copies_back(tmp_path, monkeypatch, case):
    """Exact EMD on a GPU goes through the integer auction: forced here for every problem
    on the CPU, it must fuse a permuted copy back to the original like JV does."""
    found = []

    def spied(cost, *args, **kwargs):
        columns = auction(cost, *args, **kwargs)
        found.append(columns is not None)
        return columns

    auction = assignment.auction_assign
    monkeypatch.setattr(assignment, "auction_suits", lambda device, n: True)
    monkeypatch.setattr(assignment, "auction_assign", spied)
    make, make_data = CASES[case]
    original = make(layers=2, seed=3)
    folders = [save(original, tmp_path / "original")]
    folders.append(save(permuted_copy(original, seed=10), tmp_path / "copy"))
    data = make_data(tmp_path / "data.safetensors")
    fuse(folders, tmp_path / "fused", FusionSpec(device=DEVICE, solver="emd"), data=data)
    assert found and all(found), "the auction declined a problem"
    assert_same_function(outputs(load_fused(tmp_path / "fused"), data), outputs(original, data))
