"""Metrics equal hand-computed values: parents, ensemble (mean of probabilities), vanilla
fusion skipped with a reason for different widths."""

import math

import pytest
import torch
from factories import image_data, save, text_data, tiny_bert, tiny_decoder, tiny_vit
from safetensors.torch import load_file, save_file

from fusion_core import evaluate
from fusion_core.api import prepare
from fusion_core.baselines import parents_and_ensemble, vanilla_fusion
from fusion_core.evaluate import load_eval_set, mask_tokens


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.double()


def test_classifier_metrics_and_ensemble_by_hand(tmp_path):
    models = [tiny_vit(seed=s) for s in (1, 2)]
    folders = [save(m, tmp_path / f"m{s}") for s, m in zip((1, 2), models, strict=True)]
    data_file = image_data(tmp_path / "d.safetensors", count=30)
    data = load_file(str(data_file))
    labels = data["labels"]
    logits = [_logits(m, {"pixel_values": data["pixel_values"]}) for m in models]

    rows = parents_and_ensemble(folders, load_eval_set(folders[0], data_file))
    for row, z in zip(rows[:2], logits, strict=True):
        log_p = z.log_softmax(-1)
        expected_loss = float(-log_p[torch.arange(30), labels].mean())
        expected_acc = float((z.argmax(-1) == labels).double().mean())
        assert row.metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)
        assert row.metrics["accuracy"] == pytest.approx(expected_acc)
        assert row.metrics["examples"] == 30
        assert evaluate(row.path, data_file)["loss"] == pytest.approx(expected_loss, rel=1e-5)

    probs = torch.stack([z.softmax(-1) for z in logits]).mean(0)
    ensemble = rows[2]
    assert ensemble.kind == "ensemble"
    assert ensemble.metrics["loss"] == pytest.approx(
        float(-probs[torch.arange(30), labels].log().mean()), rel=1e-5
    )
    assert ensemble.metrics["accuracy"] == pytest.approx(
        float((probs.argmax(-1) == labels).double().mean())
    )
    # the ensemble is not the mean of the members' losses: the test would catch that
    assert ensemble.metrics["loss"] != pytest.approx(
        sum(r.metrics["loss"] for r in rows[:2]) / 2, rel=1e-9
    )


def test_mlm_loss_perplexity_and_ensemble_by_hand(tmp_path):
    models = [tiny_bert("BertForMaskedLM", seed=s, mask_token_id=4) for s in (1, 2)]
    folders = [save(m, tmp_path / f"m{s}") for s, m in zip((1, 2), models, strict=True)]
    data_file = text_data(tmp_path / "t.safetensors", count=20, labels=False)
    data = load_file(str(data_file))
    ids, labels = mask_tokens(data["input_ids"], data["attention_mask"], 4)
    keep = labels != -100
    assert int(keep.sum()) > 5
    batch = {"input_ids": ids, "attention_mask": data["attention_mask"]}
    label_probs = []
    for model in models:
        log_p = _logits(model, batch).log_softmax(-1)[keep]
        label_probs.append(log_p.gather(1, labels[keep][:, None])[:, 0].exp())

    _assert_token_metrics(folders, data_file, label_probs)


def _assert_token_metrics(folders, data_file, label_probs: list[torch.Tensor]) -> None:
    """Language-model rows against each model's label probabilities at the scored tokens:
    loss, perplexity, token count; the ensemble from the mean of the probabilities."""
    rows = parents_and_ensemble(folders, load_eval_set(folders[0], data_file))
    for row, p in zip(rows[:2], label_probs, strict=True):
        loss = float(-p.log().mean())
        assert row.metrics["loss"] == pytest.approx(loss, rel=1e-5)
        assert row.metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
        assert row.metrics["tokens"] == p.numel()
        assert evaluate(row.path, data_file)["loss"] == pytest.approx(loss, rel=1e-5)
    ensemble_loss = float(-torch.stack(label_probs).mean(0).log().mean())
    assert rows[2].metrics["loss"] == pytest.approx(ensemble_loss, rel=1e-5)
    assert rows[2].metrics["perplexity"] == pytest.approx(math.exp(ensemble_loss), rel=1e-5)


@pytest.mark.parametrize("with_labels", [False, True])
def test_causal_lm_next_token_loss_and_ensemble_by_hand(tmp_path, with_labels):
    """Position t predicts token t + 1; padding is never a target; labels default to the
    inputs, and given labels (-100: ignored) are used as they are."""
    models = [tiny_decoder(seed=s) for s in (1, 2)]
    folders = [save(m, tmp_path / f"m{s}") for s, m in zip((1, 2), models, strict=True)]
    data_file = text_data(tmp_path / "t.safetensors", count=20, labels=False)
    data = load_file(str(data_file))
    ids, mask = data["input_ids"], data["attention_mask"]
    targets = ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = -100
    if with_labels:  # score only the second half of each sequence
        labels = ids.clone()
        labels[:, :5] = -100
        labels[mask == 0] = -100
        save_file({**data, "labels": labels}, str(data_file))
        targets[:, :4] = -100
    keep = targets != -100
    label_probs = []
    for model in models:
        log_p = _logits(model, {"input_ids": ids, "attention_mask": mask})[:, :-1].log_softmax(-1)
        label_probs.append(log_p[keep].gather(1, targets[keep][:, None])[:, 0].exp())

    _assert_token_metrics(folders, data_file, label_probs)


def test_vanilla_fusion_of_different_widths_is_skipped_with_a_reason(tmp_path):
    folders = [
        save(tiny_vit(hidden=16, seed=1), tmp_path / "narrow"),
        save(tiny_vit(hidden=24, intermediate=48, seed=2), tmp_path / "wide"),
    ]
    reason = vanilla_fusion(prepare(folders), tmp_path / "vanilla")
    assert reason is not None and "equal shapes" in reason and "16" in reason
    assert not (tmp_path / "vanilla").exists()
    same = [save(tiny_vit(seed=s), tmp_path / f"same{s}") for s in (1, 2)]
    assert vanilla_fusion(prepare(same), tmp_path / "vanilla") is None
    fused = load_file(str(tmp_path / "vanilla" / "model.safetensors"))
    parents = [load_file(str(f / "model.safetensors")) for f in same]
    keys = [k for k in fused if k in parents[0] and fused[k].ndim == 2]
    assert len(keys) > 5
    for key in keys:
        assert torch.allclose(fused[key], (parents[0][key] + parents[1][key]) / 2, atol=1e-6)
