"""Small ViTs trained on scikit-learn's digits: the demo's and the benchmarks' parents.

8x8 grey images, 2x2 patches; different seeds give different initializations and batch
orders, as in the paper's setup. A parent trains to ~97% test accuracy in well under a
minute on two CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

transformers.utils.logging.disable_progress_bar()


@dataclass(frozen=True)
class DigitsSplits:
    train: tuple[torch.Tensor, torch.Tensor]
    calib: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def load_digits_splits(seed: int = 0) -> DigitsSplits:
    """1,797 images: 1,257 train, 180 calibration, 360 test, pixel values scaled to [-1, 1]."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return DigitsSplits((x[:1257], y[:1257]), (x[1257:1437], y[1257:1437]), (x[1437:], y[1437:]))


def vit_config(
    hidden: int = 64, intermediate: int | None = None, layers: int = 3, heads: int = 4
) -> transformers.ViTConfig:
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config.architectures = ["ViTForImageClassification"]
    return config


def train_vit(
    seed: int,
    splits: DigitsSplits,
    epochs: int = 40,
    hidden: int = 64,
    intermediate: int | None = None,
    layers: int = 3,
    heads: int = 4,
    log=None,
) -> transformers.ViTForImageClassification:
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(vit_config(hidden, intermediate, layers, heads))
    x, y = splits.train
    return train_classifier(model, "pixel_values", x, y, epochs, seed, log)


def train_classifier(
    model: transformers.PreTrainedModel,
    input_name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    seed: int,
    log=None,
) -> transformers.PreTrainedModel:
    """The parents' recipe: AdamW, one-cycle learning rate (peak 2e-3), batches of 64 in a
    seeded order; `input_name` is the model's input (pixel_values, input_ids)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = epochs * ((len(y) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(model(**{input_name: x[idx]}).logits, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if log and (epoch + 1) % 10 == 0:
            log(f"seed {seed}: epoch {epoch + 1}/{epochs}, loss {loss.item():.3f}")
    return model.eval()


def accuracy(model: torch.nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float((model(pixel_values=split[0]).logits.argmax(-1) == split[1]).float().mean())


def save_split(split: tuple[torch.Tensor, torch.Tensor], path: Path) -> Path:
    save_file({"pixel_values": split[0].contiguous(), "labels": split[1].contiguous()}, str(path))
    return path


def save_model(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    return folder


def cached_parents(
    workdir: Path, epochs: int = 40, seeds: tuple[int, ...] = (0, 1), log=None
) -> tuple[list[Path], Path, Path]:
    """The demos' parents: ViTs trained from `seeds` once and cached in `workdir` as
    parent-<seed>/, with the test and calibration splits saved beside them."""
    workdir.mkdir(parents=True, exist_ok=True)
    splits = load_digits_splits()
    test = save_split(splits.test, workdir / "test.safetensors")
    calib = save_split(splits.calib, workdir / "calib.safetensors")
    parents = []
    for seed in seeds:
        folder = workdir / f"parent-{seed}"
        if not (folder / "model.safetensors").is_file():
            if log:
                log(f"training parent {seed} on digits ({epochs} epochs)...")
            save_model(train_vit(seed, splits, epochs=epochs, log=log), folder)
        parents.append(folder)
    return parents, test, calib
