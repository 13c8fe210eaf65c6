"""One-shot metrics of a checkpoint folder on a data file.

Metrics are computed from per-example scores (`Scores`) so that an ensemble (the mean of
several models' probabilities) is scored by exactly the same code as a single model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .activations import load_live_model
from .checkpoint import open_checkpoint
from .data import LABELS, batches, load_data
from .errors import InputError, check_cancelled
from .families import resolve_family
from .metrics import LANGUAGE_MODELING

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


def causal_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Next-token targets when a data file has none: the inputs themselves, padding ignored
    (`next_token` shifts them)."""
    if attention_mask is None:
        return input_ids.clone()
    return torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, IGNORE))


def next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts token t + 1: logits (B, T-1, V) and their targets (B, T-1)."""
    return logits[:, :-1], labels[:, 1:]


def token_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Mean cross-entropy over the scored tokens (classifiers: over examples)."""
    if task == "causal-lm":
        logits, labels = next_token(logits, labels)
    if task in LANGUAGE_MODELING:
        logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if not bool((labels != IGNORE).any()):  # a batch of padding only: nothing to learn
        return logits.sum() * 0
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE)


def language_model_labels(data: dict, task: str, model_dir: Path, config: dict, file) -> dict:
    """Labels of a language-model data file: checked when given; otherwise seeded masking
    (MLM, identical for every model) or the inputs themselves (causal LM)."""
    if LABELS in data:
        if data[LABELS].shape != data["input_ids"].shape:
            raise InputError(
                f"{file}: a language model's 'labels' must have the shape of 'input_ids' "
                f"({tuple(data[LABELS].shape)} vs {tuple(data['input_ids'].shape)})"
            )
        return data
    data = dict(data)
    if task == "causal-lm":
        data[LABELS] = causal_labels(data["input_ids"], data.get("attention_mask"))
    else:
        mask_id = mask_token_id(model_dir, config)
        data["input_ids"], data[LABELS] = mask_tokens(
            data["input_ids"], data.get("attention_mask"), mask_id
        )
    return data


@dataclass
class EvalSet:
    """A data file ready to score: inputs plus labels (seeded masks for MLM without labels,
    the inputs themselves for a causal LM without labels)."""

    task: str  # "classification" | "masked-lm" | "causal-lm"
    data: dict[str, torch.Tensor]
    path: Path


@dataclass
class Scores:
    """Per scored example (classifier) or token (the masked ones of an MLM, every next token
    of a causal LM): the log-probability of the label, and for classifiers the full
    probabilities (for accuracy and ensembling)."""

    label_log_prob: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,)
    probs: torch.Tensor | None = None  # (N, classes), classifiers only


def task_of(architecture: str) -> str:
    if architecture.endswith("ForMaskedLM"):
        return "masked-lm"
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if "Classification" in architecture:
        return "classification"
    raise InputError(f"{architecture} has no task head to evaluate")


def load_eval_set(model_dir: str | Path, data_file: str | Path) -> EvalSet:
    """Read `data_file` for the model family of `model_dir` (labels checked; MLM masking
    seeded, so every model of a job is scored on the same masked tokens; a causal LM's labels
    default to its inputs)."""
    checkpoint = open_checkpoint(model_dir)
    family, architecture = resolve_family(checkpoint.config, where=f"{model_dir}: ")
    try:
        task = task_of(architecture)
    except InputError as exc:
        raise InputError(f"{model_dir}: {exc}") from exc
    data = load_data(data_file, family)
    if task == "classification" and LABELS not in data:
        raise InputError(f"{data_file}: a classifier is evaluated against 'labels'; none found")
    if task in LANGUAGE_MODELING:
        data = language_model_labels(data, task, Path(model_dir), checkpoint.config, data_file)
    return EvalSet(task, data, Path(data_file))


def model_scores(
    model: torch.nn.Module | str | Path,
    eval_set: EvalSet,
    device: str = "cpu",
    batch_size: int = 64,
    should_cancel=None,
) -> Scores:
    """Run a model (live, or a checkpoint folder) over an EvalSet; `should_cancel` is asked
    before every batch."""
    if not isinstance(model, torch.nn.Module):
        checkpoint = open_checkpoint(model)
        _, architecture = resolve_family(checkpoint.config, where=f"{model}: ")
        model = load_live_model(Path(model), architecture, device)
    was_training = model.training
    model.eval()
    label_lp, labels_all, probs = [], [], []
    try:
        with torch.no_grad():
            for batch in batches(eval_set.data, batch_size):
                check_cancelled(should_cancel, "evaluation")
                labels = batch.pop(LABELS).to(device)
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
                if eval_set.task == "causal-lm":
                    logits, labels = next_token(logits, labels)
                if eval_set.task in LANGUAGE_MODELING:
                    keep = labels.reshape(-1) != IGNORE
                    rows = logits.reshape(-1, logits.shape[-1])[keep].log_softmax(-1)
                    targets = labels.reshape(-1)[keep]
                else:
                    rows = logits.log_softmax(-1)
                    targets = labels
                    probs.append(rows.exp().cpu())
                label_lp.append(rows.gather(1, targets[:, None])[:, 0].cpu())
                labels_all.append(targets.cpu())
    finally:
        model.train(was_training)
    return Scores(torch.cat(label_lp), torch.cat(labels_all), torch.cat(probs) if probs else None)


def metrics_from_scores(scores: Scores, task: str) -> dict[str, float]:
    """Classifiers: accuracy and mean cross-entropy. Language models: mean loss over the
    scored tokens (MLM: masked; causal: next tokens) and its perplexity."""
    count = int(scores.labels.numel())
    if count == 0:
        raise InputError("nothing to score (no labelled tokens)")
    loss = float(-scores.label_log_prob.double().mean())
    if task in LANGUAGE_MODELING:
        return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": count}
    assert scores.probs is not None
    correct = int((scores.probs.argmax(-1) == scores.labels).sum())
    return {"accuracy": correct / count, "loss": loss, "examples": count}


def ensemble_scores(members: list[Scores]) -> Scores:
    """The ensemble's prediction: the mean of the members' probabilities."""
    if not members:
        raise InputError("an ensemble needs at least one model")
    label_prob = torch.stack([s.label_log_prob.double().exp() for s in members]).mean(0)
    probs = None
    if members[0].probs is not None:
        probs = torch.stack([s.probs for s in members]).mean(0)
    return Scores(label_prob.clamp_min(1e-300).log(), members[0].labels, probs)


def evaluate(
    model_dir: str | Path, data_file: str | Path, device: str = "cpu", batch_size: int = 64
) -> dict[str, float]:
    """Classifiers: accuracy and mean cross-entropy. MLM: loss and perplexity over masked
    tokens (the file's labels, or seeded masking when it has none). Causal LM: loss and
    perplexity of the next tokens (labels default to the inputs, padding ignored)."""
    eval_set = load_eval_set(model_dir, data_file)
    scores = model_scores(model_dir, eval_set, device, batch_size)
    if scores.labels.numel() == 0:
        raise InputError(f"{data_file}: nothing to score (no labelled tokens)")
    return metrics_from_scores(scores, eval_set.task)


def mask_token_id(model_dir: Path, config: dict) -> int:
    """The mask token's id: config, WordPiece `vocab.txt` ([MASK]), BPE `vocab.json`
    (<mask>, RoBERTa) or `tokenizer.json` (its vocabulary or added tokens)."""
    if isinstance(config.get("mask_token_id"), int):
        return config["mask_token_id"]
    vocab = model_dir / "vocab.txt"
    if vocab.is_file():
        for index, token in enumerate(vocab.read_text().splitlines()):
            if token == "[MASK]":
                return index
    for name, read in (("vocab.json", lambda d: d), ("tokenizer.json", _tokenizer_vocab)):
        file = model_dir / name
        if file.is_file():
            try:
                vocab_map = read(json.loads(file.read_text()))
            except (ValueError, TypeError, KeyError, AttributeError):
                continue
            for token in ("<mask>", "[MASK]"):
                if isinstance(vocab_map.get(token), int):
                    return vocab_map[token]
    raise InputError(f"{model_dir}: cannot find the mask token id (no labels in the data)")


def _tokenizer_vocab(document: dict) -> dict:
    vocab = document["model"]["vocab"]
    added = {t["content"]: t["id"] for t in document.get("added_tokens", [])}
    return {**(vocab if isinstance(vocab, dict) else {}), **added}
