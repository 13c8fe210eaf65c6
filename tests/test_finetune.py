"""The budgeted finetune: it reduces the loss, stops at its step, epoch or seconds budget,
writes a loadable HF folder, and a cancelled finetune (or job) publishes nothing."""

import json
import math

import pytest
import torch
import transformers
from factories import image_data, save, text_data, tiny_bert, tiny_decoder, tiny_vit
from safetensors.torch import load_file, save_file

from fusion_core import CancelledError, FusionSpec, InputError, evaluate
from fusion_core.finetune import FinetuneConfig, finetune, lr_factor
from fusion_core.job import fuse_job


@pytest.fixture
def vit(tmp_path):
    return save(tiny_vit(seed=1), tmp_path / "vit")


@pytest.fixture
def train(tmp_path):
    """Learnable labels: which quadrant of the image is brightest."""
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randn(64, 1, 8, 8, generator=gen)
    quadrants = pixels.unfold(2, 4, 4).unfold(3, 4, 4).mean((-1, -2)).reshape(64, 4)
    path = tmp_path / "train.safetensors"
    save_file({"pixel_values": pixels, "labels": quadrants.argmax(-1)}, str(path))
    return path


def test_schedule_warms_up_then_decays_to_zero():
    assert lr_factor(0.0, 0.1) == 0.0
    assert lr_factor(0.05, 0.1) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1) == pytest.approx(1.0)
    assert lr_factor(0.55, 0.1) == pytest.approx(0.5)
    assert lr_factor(1.0, 0.1) == pytest.approx(0.0, abs=1e-12)


def test_finetune_reduces_loss_and_stops_at_the_step_budget(vit, train, tmp_path):
    before = evaluate(vit, train)["loss"]
    steps = []
    result = finetune(
        vit,
        train,
        tmp_path / "ft",
        FinetuneConfig(steps=80, lr=3e-3, batch_size=16),
        progress=lambda p: steps.append((p.step, p.total)),
    )
    assert result.run.steps == 80 and result.run.stopped_by == "steps"
    assert steps[-1] == (80, 80) and len(steps) == 80
    after = evaluate(tmp_path / "ft", train)["loss"]
    assert after < before - 0.1
    assert result.run.losses[-1][0] == 80
    model = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "ft"))
    assert model.config.hidden_size == 16
    record = json.loads((tmp_path / "ft" / "fusion.json").read_text())
    assert record["finetune"]["steps"] == 80 and record["finetune"]["config"]["lr"] == 3e-3
    assert "## Finetune" in (tmp_path / "ft" / "README.md").read_text()


def test_epoch_and_seconds_budgets(vit, train, tmp_path):
    by_epochs = finetune(vit, train, tmp_path / "e", FinetuneConfig(epochs=1.5, batch_size=16))
    assert by_epochs.run.steps == math.ceil(1.5 * 4) and by_epochs.run.stopped_by == "epochs"
    by_time = finetune(
        vit, train, tmp_path / "s", FinetuneConfig(steps=10**6, seconds=0.5, batch_size=8)
    )
    assert by_time.run.stopped_by == "seconds"
    assert 1 <= by_time.run.steps < 10**6 and by_time.run.seconds < 3.0
    # the schedule followed the clock: warmup, then a decay that never goes back up
    lrs = [v for _, v in by_time.run.lr]
    peak = lrs.index(max(lrs))
    assert max(lrs) <= 1e-4 and lrs[-1] < 1e-4
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False))


def test_cancelled_finetune_writes_nothing(vit, train, tmp_path):
    calls = []

    def cancel_at_third_step():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(CancelledError):
        finetune(
            vit,
            train,
            tmp_path / "ft",
            FinetuneConfig(steps=50),
            should_cancel=cancel_at_third_step,
        )
    assert not (tmp_path / "ft").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_cancelled_job_during_finetune_publishes_nothing(tmp_path, train):
    models = [save(tiny_vit(seed=s), tmp_path / f"m{s}") for s in (1, 2)]
    test = image_data(tmp_path / "test.safetensors", seed=4)
    events = []

    def cancel_in_finetune():  # from the events' typed fields, not their text
        return any(e.run == "fused" and e.step >= 2 for e in events if e.stage == "finetuning")

    with pytest.raises(CancelledError):
        fuse_job(
            models,
            tmp_path / "out",
            FusionSpec(),
            eval_data=test,
            finetune_config=FinetuneConfig(steps=20),
            finetune_data=train,
            progress=events.append,
            should_cancel=cancel_in_finetune,
        )
    assert list(dict.fromkeys(e.stage for e in events)) == ["aligning", "evaluating", "finetuning"]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_mlm_finetune_masks_afresh(tmp_path):
    mlm = save(tiny_bert("BertForMaskedLM", seed=1, mask_token_id=4), tmp_path / "mlm")
    data = text_data(tmp_path / "t.safetensors", count=16, labels=False)
    result = finetune(mlm, data, tmp_path / "ft", FinetuneConfig(steps=3, batch_size=8))
    assert result.run.steps == 3 and all(math.isfinite(v) for _, v in result.run.losses)
    assert evaluate(tmp_path / "ft", data)["tokens"] == evaluate(mlm, data)["tokens"]


def test_bad_budgets(vit, train, tmp_path):
    from fusion_core import InputError

    for bad in (FinetuneConfig(steps=0), FinetuneConfig(seconds=-1), FinetuneConfig(lr=0)):
        with pytest.raises(InputError):
            finetune(vit, train, tmp_path / "x", bad)
    assert FinetuneConfig().validate().epochs == 1.0


def test_bf16_causal_lm_finetune_learns_and_stays_bf16(tmp_path):
    """Next-token loss on a learnable sequence falls; the bf16 checkpoint stays bf16."""
    llama = save(tiny_decoder(seed=1).to(torch.bfloat16), tmp_path / "llama")
    ids = (torch.arange(10)[None, :] * 3 + torch.arange(32)[:, None]) % 35 + 5  # +3 per step
    data = tmp_path / "count.safetensors"
    save_file({"input_ids": ids}, str(data))
    before = evaluate(llama, data)["loss"]
    finetune(llama, data, tmp_path / "ft", FinetuneConfig(steps=30, lr=1e-2, batch_size=16))
    assert evaluate(tmp_path / "ft", data)["loss"] < before - 0.5
    stored = load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}


def _teacher_kl(model_dir, teachers, data, task="classification", temperature=1.0) -> float:
    """KL(ensemble of the teachers || model) on a data file, as the finetune computes it."""
    from fusion_core.finetune import teacher_kl

    batch = {k: v for k, v in load_file(str(data)).items() if k != "labels"}
    labels = load_file(str(data)).get("labels")

    def logits(folder):
        config = json.loads((folder / "config.json").read_text())
        model = getattr(transformers, config["architectures"][0]).from_pretrained(str(folder))
        with torch.no_grad():
            return model.eval()(**batch).logits

    if labels is None:  # a causal LM scores its next tokens
        labels = batch["input_ids"]
    kl = teacher_kl(logits(model_dir), [logits(t) for t in teachers], labels, task, temperature)
    return float(kl)


def test_distillation_brings_the_model_closer_to_the_parents_ensemble(train, tmp_path):
    """Same steps, same data order: the distilled model ends closer (in KL) to the teachers'
    ensemble than it started, and closer than the plainly finetuned one; the run records its
    healing mode."""
    student = save(tiny_vit(seed=1), tmp_path / "student")
    teachers = [save(tiny_vit(seed=s), tmp_path / f"teacher{s}") for s in (2, 3)]
    before = _teacher_kl(student, teachers, train)
    base = dict(steps=40, lr=3e-3, batch_size=16)
    plain = finetune(
        student, train, tmp_path / "plain", FinetuneConfig(**base, distill=0), teachers=teachers
    )
    taught = finetune(
        student,
        train,
        tmp_path / "distilled",
        FinetuneConfig(**base, distill=0.9, temperature=2.0),
        teachers=teachers,
    )
    assert (plain.run.healing, taught.run.healing) == ("plain", "distill")
    distilled = _teacher_kl(tmp_path / "distilled", teachers, train)
    assert distilled < 0.5 * before
    assert distilled < 0.5 * _teacher_kl(tmp_path / "plain", teachers, train)
    record = json.loads((tmp_path / "distilled" / "fusion.json").read_text())
    assert record["finetune"]["healing"] == "distill"
    assert record["finetune"]["config"]["distill"] == 0.9


def test_causal_lm_distillation_is_token_level(tmp_path):
    student = save(tiny_decoder(seed=1), tmp_path / "student")
    teachers = [save(tiny_decoder(seed=s), tmp_path / f"teacher{s}") for s in (2, 3)]
    data = text_data(tmp_path / "d.safetensors", labels=False)
    before = _teacher_kl(student, teachers, data, "causal-lm")
    config = FinetuneConfig(steps=30, lr=3e-3, batch_size=8, distill=1.0, temperature=1.0)
    finetune(student, data, tmp_path / "distilled", config, teachers=teachers)
    assert _teacher_kl(tmp_path / "distilled", teachers, data, "causal-lm") < 0.5 * before


def test_without_teachers_the_finetune_is_plain(vit, train, tmp_path):
    result = finetune(vit, train, tmp_path / "ft", FinetuneConfig(steps=2, distill=0.5))
    assert result.run.healing == "plain"
    record = json.loads((tmp_path / "ft" / "fusion.json").read_text())
    assert record["finetune"]["healing"] == "plain"


@pytest.mark.parametrize("field,value", [("distill", -0.1), ("distill", 1.5), ("temperature", 0)])
def test_bad_distillation_settings_name_their_field(field, value):
    with pytest.raises(InputError) as error:
        FinetuneConfig(steps=1, **{field: value}).validate()
    assert error.value.field == field
