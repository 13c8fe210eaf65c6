"""One-shot metrics of a checkpoint folder on a data file."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .activations import load_live_model
from .checkpoint import open_checkpoint
from .data import LABELS, batches, load_data
from .errors import InputError
from .families import resolve_family

MLM_PROBABILITY = 0.15
IGNORE = -100


def mask_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, mask_id: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style seeded masking, identical for every model: 15% of real tokens become
    [MASK] (all of them, so runs are comparable) and are the only ones scored."""
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.rand(input_ids.shape, generator=gen) < MLM_PROBABILITY
    if attention_mask is not None:
        chosen &= attention_mask.bool()
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    return torch.where(chosen, torch.full_like(input_ids, mask_id), input_ids), labels


def evaluate(
    model_dir: str | Path, data_file: str | Path, device: str = "cpu", batch_size: int = 64
) -> dict[str, float]:
    """Classifiers: accuracy and mean cross-entropy. MLM: loss and perplexity over masked
    tokens (the file's labels, or seeded masking when it has none)."""
    checkpoint = open_checkpoint(model_dir)
    family, architecture = resolve_family(checkpoint.config, where=f"{model_dir}: ")
    data = load_data(data_file, family)
    model = load_live_model(Path(model_dir), architecture, device)
    is_mlm = architecture.endswith("ForMaskedLM")
    is_classifier = "Classification" in architecture
    if not (is_mlm or is_classifier):
        raise InputError(f"{model_dir}: {architecture} has no task head to evaluate")
    if is_classifier and LABELS not in data:
        raise InputError(f"{data_file}: a classifier is evaluated against 'labels'; none found")
    if is_mlm and LABELS not in data:
        mask_id = checkpoint.config.get("mask_token_id") or _mask_token_id(Path(model_dir))
        data = dict(data)
        data["input_ids"], data[LABELS] = mask_tokens(
            data["input_ids"], data.get("attention_mask"), mask_id
        )

    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches(data, batch_size):
            labels = batch.pop(LABELS).to(device)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            if is_mlm:
                flat = labels.reshape(-1)
                loss_sum += float(
                    F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]),
                        flat,
                        ignore_index=IGNORE,
                        reduction="sum",
                    )
                )
                count += int((flat != IGNORE).sum())
            else:
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
                count += labels.shape[0]
    if count == 0:
        raise InputError(f"{data_file}: nothing to score (no labelled tokens)")
    loss = loss_sum / count
    if is_mlm:
        return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": count}
    return {"accuracy": correct / count, "loss": loss, "examples": count}


def _mask_token_id(model_dir: Path) -> int:
    vocab = model_dir / "vocab.txt"
    if vocab.is_file():
        for index, token in enumerate(vocab.read_text().splitlines()):
            if token == "[MASK]":
                return index
    raise InputError(f"{model_dir}: cannot find the [MASK] token id (no labels in the data)")
