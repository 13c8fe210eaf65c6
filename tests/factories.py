"""Small random models, permuted copies of them, and data files, for the tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

# Device for alignment and OT in the engine tests (CI: cpu; on a GPU host: cuda).
DEVICE = os.environ.get("OTFUSE_TEST_DEVICE", "cpu")


def tiny_bert(
    architecture="BertForSequenceClassification",
    hidden=16,
    heads=2,
    intermediate=32,
    layers=2,
    vocab=40,
    seed=0,
    **extra,
) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=24,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **extra,
    )
    config.architectures = [architecture]
    return getattr(transformers, architecture)(config).eval()


def tiny_vit(
    architecture="ViTForImageClassification",
    hidden=16,
    heads=2,
    intermediate=32,
    layers=2,
    seed=0,
    **extra,
) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        num_labels=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **extra,
    )
    config.architectures = [architecture]
    return getattr(transformers, architecture)(config).eval()


def save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    return folder


def _perm(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen)


def head_perm(heads: int, head_dim: int, gen: torch.Generator) -> torch.Tensor:
    """Permute whole heads, then the dimensions inside each head."""
    order = _perm(heads, gen)
    return torch.cat([order[h] * head_dim + _perm(head_dim, gen) for h in range(heads)])


def permuted_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The same function with its residual stream, heads, dimensions inside heads, MLP
    neurons and pooler units permuted. Written from the module structure, independently of
    the family descriptions under test."""
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden // heads
    res = _perm(hidden, gen)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def rows(key, p):
        state[key] = state[key][p]

    def cols(key, p):
        state[key] = state[key][:, p]

    def last(key, p):
        state[key] = state[key][..., p]

    for key in list(state):
        if (
            key.endswith(("position_ids", "token_type_ids"))
            and "embeddings." in key
            and key.count(".") <= 3
        ):
            continue
        is_res_vector = any(
            s in key
            for s in (
                "LayerNorm",
                "layernorm",
                "embeddings.cls_token",
                "embeddings.position_embeddings",
                "word_embeddings",
                "token_type_embeddings",
                "patch_embeddings.projection.bias",
            )
        )
        if is_res_vector and "predictions" not in key:
            last(key, res)
    for key in [k for k in state if k.endswith("patch_embeddings.projection.weight")]:
        rows(key, res)

    prefix = (
        "bert."
        if any(k.startswith("bert.") for k in state)
        else ("vit." if any(k.startswith("vit.") for k in state) else "")
    )
    layer_names = sorted(
        {
            k.split(".")[len(prefix.split(".")) if prefix else 2]
            for k in state
            if ".layers." in k or ".layer." in k
        }
    )
    del layer_names
    for i in range(config.num_hidden_layers):
        names = _layer_keys(state, prefix, i)
        qk, v = head_perm(heads, head_dim, gen), None
        heads_order = qk.view(heads, head_dim)[:, 0] // head_dim
        v = torch.cat([heads_order[h] * head_dim + _perm(head_dim, gen) for h in range(heads)])
        mlp = _perm(config.intermediate_size, gen)
        for name in ("query", "key"):
            rows(names[name] + ".weight", qk)
            rows(names[name] + ".bias", qk)
            cols(names[name] + ".weight", res)
        rows(names["value"] + ".weight", v)
        rows(names["value"] + ".bias", v)
        cols(names["value"] + ".weight", res)
        cols(names["attn_out"] + ".weight", v)
        rows(names["attn_out"] + ".weight", res)
        rows(names["attn_out"] + ".bias", res)
        rows(names["fc1"] + ".weight", mlp)
        rows(names["fc1"] + ".bias", mlp)
        cols(names["fc1"] + ".weight", res)
        cols(names["fc2"] + ".weight", mlp)
        rows(names["fc2"] + ".weight", res)
        rows(names["fc2"] + ".bias", res)
    if any("pooler.dense" in k for k in state):
        pool = _perm(hidden, gen)
        key = next(k for k in state if k.endswith("pooler.dense.weight"))
        state[key] = state[key][pool][:, res]
        bias = key.replace("weight", "bias")
        state[bias] = state[bias][pool]
        if "classifier.weight" in state:
            cols("classifier.weight", pool)
    elif "classifier.weight" in state:
        cols("classifier.weight", res)
    if "cls.predictions.transform.dense.weight" in state:
        key = "cls.predictions.transform.dense.weight"
        state[key] = state[key][res][:, res]
        rows("cls.predictions.transform.dense.bias", res)
        for k in (
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.LayerNorm.bias",
        ):
            rows(k, res)
        if "cls.predictions.decoder.weight" in state:
            cols("cls.predictions.decoder.weight", res)
    copy = type(model)(config).eval()
    copy.load_state_dict(state)
    return copy


def _layer_keys(state: dict, prefix: str, i: int) -> dict[str, str]:
    if f"{prefix}encoder.layer.{i}.attention.self.query.weight" in state:  # BERT
        base = f"{prefix}encoder.layer.{i}."
        return {
            "query": base + "attention.self.query",
            "key": base + "attention.self.key",
            "value": base + "attention.self.value",
            "attn_out": base + "attention.output.dense",
            "fc1": base + "intermediate.dense",
            "fc2": base + "output.dense",
        }
    base = f"{prefix}encoder.layer.{i}."  # ViT, transformers 4 module names
    if f"{base}attention.attention.query.weight" in state:
        return {
            "query": base + "attention.attention.query",
            "key": base + "attention.attention.key",
            "value": base + "attention.attention.value",
            "attn_out": base + "attention.output.dense",
            "fc1": base + "intermediate.dense",
            "fc2": base + "output.dense",
        }
    base = f"{prefix}layers.{i}."  # ViT, transformers 5 module names
    return {
        "query": base + "attention.q_proj",
        "key": base + "attention.k_proj",
        "value": base + "attention.v_proj",
        "attn_out": base + "attention.o_proj",
        "fc1": base + "mlp.fc1",
        "fc2": base + "mlp.fc2",
    }


def text_data(path: Path, count=24, seq=10, vocab=40, seed=0, labels=True) -> Path:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (count, seq), generator=gen)
    mask = torch.ones(count, seq, dtype=torch.long)
    lengths = torch.randint(4, seq + 1, (count,), generator=gen)
    for row, length in enumerate(lengths):
        mask[row, length:] = 0
        ids[row, length:] = 0
    tensors = {"input_ids": ids, "attention_mask": mask}
    if labels:
        tensors["labels"] = torch.randint(0, 3, (count,), generator=gen)
    save_file(tensors, str(path))
    return path


def image_data(path: Path, count=24, seed=0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    save_file(
        {
            "pixel_values": torch.randn(count, 1, 8, 8, generator=gen),
            "labels": torch.randint(0, 4, (count,), generator=gen),
        },
        str(path),
    )
    return path


def rewrite_keys(folder: Path, rename) -> None:
    """Rename a saved checkpoint's keys (legacy names, prefixes) in place."""
    file = folder / "model.safetensors"
    state = load_file(str(file))
    save_file({rename(k): v for k, v in state.items()}, str(file), metadata={"format": "pt"})
