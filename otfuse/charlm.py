"""Small character-level causal LMs on license texts that ship with Python (and Debian): the
decoder behaviour test's and benchmark's parents.

Different seeds give different initializations and batch orders on the same training text.
A 2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads) trains in a
few seconds on two CPU cores.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

transformers.utils.logging.disable_progress_bar()

TEXTS = (
    Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt",  # every CPython install
    Path("/usr/share/common-licenses/GPL-3"),  # Debian and Ubuntu
    Path("/usr/share/common-licenses/Apache-2.0"),
)


@dataclass(frozen=True)
class CharSplits:
    """Sequences of `seq_len` character ids: train, calibration (for activations and the
    sweep), test (for the reported numbers)."""

    vocab: str
    train: torch.Tensor  # (N, seq_len) long
    calib: torch.Tensor
    test: torch.Tensor


def load_text() -> str:
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in TEXTS if p.is_file()]
    if not texts:
        raise FileNotFoundError(f"none of {', '.join(map(str, TEXTS))} exists")
    return "\n".join(" ".join(t.split()) for t in texts)  # whitespace collapsed


def char_splits(seq_len: int = 64, seed: int = 0) -> CharSplits:
    """Non-overlapping windows in a seeded order: 80% train, 10% calibration, 10% test."""
    text = load_text()
    vocab = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    count = len(ids) // seq_len
    windows = ids[: count * seq_len].reshape(count, seq_len)
    windows = windows[torch.randperm(count, generator=torch.Generator().manual_seed(seed))]
    train, calib = int(0.8 * count), int(0.9 * count)
    return CharSplits(vocab, windows[:train], windows[train:calib], windows[calib:])


def char_lm_config(
    family: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4
) -> transformers.PretrainedConfig:
    """A Llama (2 key/value heads for its 4 query heads, untied head) or a GPT-2 (tied)."""
    if family == "llama":
        config = transformers.LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
        config.architectures = ["LlamaForCausalLM"]
    else:
        config = transformers.GPT2Config(
            n_embd=hidden, n_inner=2 * hidden, n_layer=layers, n_head=heads, n_positions=256
        )
        config.architectures = ["GPT2LMHeadModel"]
    config.vocab_size = vocab_size
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None
    return config


def train_char_lm(
    seed: int,
    splits: CharSplits,
    family: str = "llama",
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 3e-3,
    log=None,
) -> transformers.PreTrainedModel:
    """AdamW with a short warmup and cosine decay on next-character loss, on one CPU thread:
    a model this small is dominated by per-op overhead, and more threads only fight other
    processes for cores (10x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(seed, splits, family, steps, batch_size, lr, log)
    finally:
        torch.set_num_threads(threads)


def _train(seed, splits, family, steps, batch_size, lr, log) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = char_lm_config(family, len(splits.vocab))
    model = getattr(transformers, config.architectures[0])(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = steps // 10

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        batch = splits.train[torch.randint(len(splits.train), (batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if log and (step + 1) % 100 == 0:
            log(f"{family} seed {seed}: step {step + 1}/{steps}, loss {loss.item():.3f}")
    return model.eval()


def save_split(windows: torch.Tensor, path: Path) -> Path:
    """A data file of `input_ids` (no labels: a causal LM predicts its next inputs)."""
    save_file({"input_ids": windows.contiguous()}, str(path))
    return path


def save_model(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    return folder
