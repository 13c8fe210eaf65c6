"""A short, budgeted finetune that heals a fused model (paper sec. 5.2, app. E).

AdamW with linear warmup then cosine decay to zero. The budget is steps, epochs or seconds,
whichever runs out first; the schedule follows the budget's progress
t = max(step / planned steps, elapsed / seconds), so a time budget gets a full schedule too.
Weights train in fp32 whatever the checkpoint's dtype, with bf16 autocast on CUDA only (CPU
runs in fp32), and are written back in the checkpoint's dtype. The result is written
atomically as an HF folder; a cancelled or failed finetune writes nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .activations import load_live_model
from .checkpoint import open_checkpoint
from .data import LABELS, load_data
from .errors import CancelledError, InputError
from .evaluate import (
    IGNORE,
    language_model_labels,
    mask_token_id,
    mask_tokens,
    next_token,
    task_of,
    token_loss,
)
from .families import resolve_family
from .files import SIDE_FILES
from .metrics import LANGUAGE_MODELING, FinetuneRun
from .progress import Progress
from .spec import FinetuneConfig
from .writer import check_output_dir

MAX_CURVE_POINTS = 500


@dataclass
class FinetuneResult:
    out: Path
    run: FinetuneRun
    curve: list[tuple[int, float]] = field(default_factory=list)


def lr_factor(t: float, warmup: float) -> float:
    """Linear warmup over [0, warmup), then cosine from 1 to 0 over [warmup, 1]."""
    if t < warmup:
        return (t / warmup) if warmup > 0 else 1.0
    progress = min(1.0, (t - warmup) / max(1e-12, 1 - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def finetune(
    model_dir: str | Path,
    data_file: str | Path,
    out: str | Path,
    config: FinetuneConfig | None = None,
    name: str = "fused",
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    teachers: Sequence[str | Path] = (),
) -> FinetuneResult:
    """Finetune the checkpoint at `model_dir` on `data_file` (labels for classifiers; MLM
    data without labels is masked afresh each step; a causal LM learns its next tokens, the
    inputs unless labels say otherwise) and write it to `out` atomically.

    With `teachers` (checkpoint folders, the parents of a fusion) and `config.distill` > 0
    the loss also pulls the model towards their ensemble (the mean of their probabilities at
    `config.temperature`), on the tokens the labels score; their logits are computed batch
    by batch, under no_grad. Without teachers the finetune is plain."""
    config = (config or FinetuneConfig()).validate()
    out = Path(out)
    check_output_dir(out)
    report = progress or (lambda _p: None)
    cancelled = should_cancel or (lambda: False)
    model_dir = Path(model_dir)
    checkpoint = open_checkpoint(model_dir)
    family, architecture = resolve_family(checkpoint.config, where=f"{model_dir}: ")
    task = task_of(architecture)
    data = load_data(data_file, family)
    if task == "classification" and LABELS not in data:
        raise InputError(f"{data_file}: finetuning a classifier needs 'labels'; none found")
    mask_id = None
    if task == "masked-lm" and LABELS not in data:  # masked afresh each step
        mask_id = mask_token_id(model_dir, checkpoint.config)
    elif task in LANGUAGE_MODELING:
        data = language_model_labels(data, task, model_dir, checkpoint.config, data_file)

    device = torch.device(config.device or "cpu")
    model = load_live_model(model_dir, architecture, str(device))
    teacher_models = []
    if config.distill > 0:
        for teacher in teachers:  # none: plain
            teacher_arch = resolve_family(open_checkpoint(Path(teacher)).config)[1]
            if task_of(teacher_arch) != task:
                raise InputError(f"{teacher}: a {teacher_arch} cannot teach a {architecture}")
            teacher_models.append(load_live_model(Path(teacher), teacher_arch, str(device)))
    # fp32 master weights whatever the checkpoint stores (AdamW's small updates vanish in
    # bf16/fp16); the result is written back in the stored dtype
    stored_dtype = model.dtype
    model.float().train()
    count = next(iter(data.values())).shape[0]
    batch_size = min(config.batch_size, count)
    per_epoch = math.ceil(count / batch_size)
    planned = [v for v in (config.steps, _epoch_steps(config.epochs, per_epoch)) if v]
    max_steps = min(planned) if planned else None
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    use_bf16 = device.type == "cuda"
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[tuple[int, float]] = []
    lrs: list[tuple[int, float]] = []
    step, stopped_by = 0, ""
    started = time.perf_counter()
    order = torch.randperm(count, generator=gen)
    cursor = 0

    def budget_used() -> float:
        used = step / max_steps if max_steps else 0.0
        if config.seconds:
            used = max(used, (time.perf_counter() - started) / config.seconds)
        return used

    while True:
        t = budget_used()
        if t >= 1.0 or (max_steps is not None and step >= max_steps):
            if max_steps is not None and step >= max_steps:
                by_steps = config.steps is not None and step >= config.steps
                stopped_by = "steps" if by_steps else "epochs"
            else:
                stopped_by = "seconds"
            break
        if cancelled():
            raise CancelledError(f"finetune of the {name} model cancelled at step {step}")
        if cursor >= count:
            order, cursor = torch.randperm(count, generator=gen), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        batch = {k: v[idx] for k, v in data.items()}
        if mask_id is not None:
            batch["input_ids"], batch[LABELS] = mask_tokens(
                batch["input_ids"], batch.get("attention_mask"), mask_id, seed=config.seed + step
            )
        lr = config.lr * lr_factor(t, config.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        labels = batch.pop(LABELS).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        loss = token_loss(logits.float(), labels, task)
        if teacher_models:
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=use_bf16):
                inputs = {k: v.to(device) for k, v in batch.items()}
                taught = [t(**inputs).logits.float() for t in teacher_models]
            kl = teacher_kl(logits.float(), taught, labels, task, config.temperature)
            loss = (1 - config.distill) * loss + config.distill * config.temperature**2 * kl
        if not torch.isfinite(loss):
            raise InputError(f"finetune of the {name} model diverged at step {step} (loss {loss})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        step += 1
        value = float(loss.detach())
        losses.append((step, value))
        lrs.append((step, lr))
        total = max_steps or max(step, round(step / max(budget_used(), 1e-9)))
        report(
            Progress(
                step,
                total,
                f"finetune {name}: step {step}/{total}, loss {value:.4f}",
                stage="finetuning",
                unit="step",
                run=name,
            )
        )

    seconds = time.perf_counter() - started
    model.eval()
    run = FinetuneRun(
        name,
        step,
        round(step * batch_size / count, 4),
        round(seconds, 3),
        stopped_by,
        _thin(losses),
        _thin(lrs),
        healing=config.healing(len(teacher_models)),
    )
    if cancelled():
        raise CancelledError(f"finetune of the {name} model cancelled")
    _write(model.to(dtype=stored_dtype), model_dir, out, run, config)
    return FinetuneResult(out, run, losses)


def teacher_kl(
    logits: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    task: str,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher_T || student_T), averaged over the scored examples or tokens (those the
    labels do not ignore; a causal LM's positions predict the next token). The teacher is the
    ensemble: the mean of the teachers' probabilities at temperature T."""
    student, teachers = logits, list(teacher_logits)
    if task == "causal-lm":
        student, labels = next_token(student, labels)
        teachers = [t[:, :-1] for t in teachers]
    width = student.shape[-1]
    if any(t.shape[-1] != width for t in teachers):
        raise InputError(f"teachers' outputs differ from the model's {width} classes/tokens")
    scored = (labels != IGNORE).reshape(-1) if task != "classification" else None
    student = student.reshape(-1, width)
    teachers = [t.reshape(-1, width) for t in teachers]
    if scored is not None:
        if not bool(scored.any()):
            return student.sum() * 0
        student, teachers = student[scored], [t[scored] for t in teachers]
    probs = torch.stack([torch.softmax(t / temperature, -1) for t in teachers]).mean(0)
    log_student = torch.log_softmax(student / temperature, -1)
    log_teacher = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    return (probs * (log_teacher - log_student)).sum(-1).mean()


def _epoch_steps(epochs: float | None, per_epoch: int) -> int | None:
    return max(1, math.ceil(epochs * per_epoch)) if epochs else None


def _thin(curve: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """At most MAX_CURVE_POINTS points, the last one kept."""
    if len(curve) <= MAX_CURVE_POINTS:
        return list(curve)
    stride = math.ceil(len(curve) / MAX_CURVE_POINTS)
    thinned = curve[::stride]
    if thinned[-1] != curve[-1]:
        thinned.append(curve[-1])
    return thinned


def _write(
    model: torch.nn.Module, source: Path, out: Path, run: FinetuneRun, config: FinetuneConfig
) -> None:
    """save_pretrained into a temporary folder beside `out`, then rename it into place."""
    check_output_dir(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        model.to("cpu").save_pretrained(str(tmp), safe_serialization=True)
        for name in SIDE_FILES:
            if (source / name).is_file() and not (tmp / name).exists():
                shutil.copy2(source / name, tmp / name)
        record_file = source / "fusion.json"
        record = json.loads(record_file.read_text()) if record_file.is_file() else {}
        record["finetune"] = {
            "config": config.to_dict(),
            "healing": run.healing,
            **_run_summary(run),
        }
        (tmp / "fusion.json").write_text(json.dumps(record, indent=2) + "\n")
        card = (source / "README.md").read_text() if (source / "README.md").is_file() else ""
        card += (
            "\n## Finetune\n"
            f"Finetuned for {run.steps} steps ({run.epochs:g} epochs, {run.seconds:.1f} s, "
            f"stopped by the {run.stopped_by} budget) with AdamW, lr {config.lr:g}, "
            f"batch size {config.batch_size}, warmup {config.warmup:g} then cosine"
            + (
                f", distilled from the parents' ensemble (weight {config.distill:g}, "
                f"temperature {config.temperature:g}).\n"
                if run.healing == "distill"
                else ".\n"
            )
        )
        (tmp / "README.md").write_text(card)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _run_summary(run: FinetuneRun) -> dict:
    return {
        "steps": run.steps,
        "epochs": run.epochs,
        "seconds": run.seconds,
        "stopped_by": run.stopped_by,
        "final_loss": run.losses[-1][1] if run.losses else None,
    }
