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


# Weights large enough that attention patterns depend on the input (at the library default of
# 0.02 every head attends almost uniformly, and a broken head map would go unnoticed).
INIT = 0.2
MODEL_TYPES = {  # class name prefix -> model_type
    "XLMRoberta": "xlm-roberta",
    "Roberta": "roberta",
    "DistilBert": "distilbert",
    "GPT2": "gpt2",
    "Llama": "llama",
    "Mistral": "mistral",
    "Qwen2": "qwen2",
}
SIZE_FIELDS = {  # size -> config field, by model_type where it differs from BERT's names
    None: ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
    "distilbert": ("dim", "n_layers", "n_heads", "hidden_dim"),
    "gpt2": ("n_embd", "n_layer", "n_head", "n_inner"),
}


def tiny(
    architecture, hidden=16, heads=2, intermediate=32, layers=2, vocab=40, seed=0, **extra
) -> torch.nn.Module:
    """A small random RoBERTa / XLM-R, DistilBERT, GPT-2, Llama, Mistral or Qwen2 (by the
    class name), in eval mode."""
    model_type = next(t for prefix, t in MODEL_TYPES.items() if architecture.startswith(prefix))
    fields = SIZE_FIELDS.get(model_type, SIZE_FIELDS[None])
    sizes = dict(zip(fields, (hidden, layers, heads, intermediate), strict=True))
    positions = "n_positions" if model_type == "gpt2" else "max_position_embeddings"
    config = transformers.AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        num_labels=3,
        initializer_range=INIT,
        bos_token_id=0,
        eos_token_id=0,
        **{positions: 32},  # RoBERTa's positions start after the padding index
        **sizes,
        **extra,
    )
    return _build(architecture, config, seed)


def tiny_decoder(
    architecture="LlamaForCausalLM", heads=4, kv_heads=2, head_dim=None, tie=False, **sizes
) -> torch.nn.Module:
    """A Llama, Mistral or Qwen2 with grouped-query rotary attention (4 query heads reading
    2 key/value heads by default)."""
    return tiny(
        architecture,
        heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or sizes.get("hidden", 16) // heads,
        tie_word_embeddings=tie,
        pad_token_id=0,
        **sizes,
    )


def _build(architecture: str, config, seed: int) -> torch.nn.Module:
    """A random model whose norms and biases are random too (unit norms and zero biases
    would hide a vector that is not permuted with its space)."""
    torch.manual_seed(seed)
    config.architectures = [architecture]
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    return folder


def _perm(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen)


def head_perm(heads: int, head_dim: int, gen: torch.Generator) -> torch.Tensor:
    """Permute whole heads, then the dimensions inside each head."""
    order = _perm(heads, gen)
    return torch.cat([order[h] * head_dim + _perm(head_dim, gen) for h in range(heads)])


def whole_heads(order: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Move whole heads (new head h is old head order[h]), nothing inside them."""
    return (order[:, None] * head_dim + torch.arange(head_dim)).flatten()


class _State:
    """A state dict being permuted: `take(key, axis, perm)` makes index i of the new tensor
    what index perm[i] of the old one was (keys the model lacks are skipped)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.tensors = {k: v.clone() for k, v in model.state_dict().items()}
        prefix = model.base_model_prefix
        has_prefix = any(k.startswith(prefix + ".") for k in self.tensors)
        self.prefix = prefix + "." if has_prefix else ""

    def take(self, key: str, axis: int, perm: torch.Tensor, base: bool = True) -> None:
        key = (self.prefix if base else "") + key
        if key in self.tensors:
            self.tensors[key] = self.tensors[key].index_select(axis, perm)

    def linear(self, module: str, out=None, inp=None, base=True, conv1d=False) -> None:
        """A dense layer's rows (outputs) and columns (inputs); Conv1D stores (in, out)."""
        out_axis, in_axis = (1, 0) if conv1d else (0, 1)
        if out is not None:
            self.take(f"{module}.weight", out_axis, out, base)
            self.take(f"{module}.bias", 0, out, base)
        if inp is not None:
            self.take(f"{module}.weight", in_axis, inp, base)

    def vector(self, module: str, perm: torch.Tensor, base=True) -> None:
        """LayerNorm / RMSNorm weight and bias, or embedding tables' last axis."""
        for leaf in ("weight", "bias"):
            key = (self.prefix if base else "") + f"{module}.{leaf}"
            if key in self.tensors:
                self.tensors[key] = self.tensors[key].index_select(-1, perm)


def permuted_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The same function with its residual stream, heads (key/value groups and the query heads
    inside them), dimensions inside heads (values only under rotary embeddings), MLP neurons
    and pooler units permuted. Written from the module structure, independently of the family
    descriptions under test."""
    gen = torch.Generator().manual_seed(seed)
    state = _State(model)
    kind = model.config.model_type
    if kind in ("llama", "mistral", "qwen2"):
        _permute_decoder(state, model.config, gen)
    elif kind == "gpt2":
        _permute_gpt2(state, model.config, gen)
    else:
        _permute_encoder(state, model.config, gen)
    copy = type(model)(model.config).eval()
    copy.load_state_dict(state.tensors)
    return copy


def _permute_decoder(state: _State, config, gen: torch.Generator) -> None:
    hidden, heads, groups = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
    )
    head_dim, ratio = config.head_dim, heads // groups
    res = _perm(hidden, gen)
    group_order = _perm(groups, gen)  # new key/value head g is old head group_order[g]
    # new query head g*r + s: a query head of old group group_order[g], shuffled in the group
    query_order = torch.cat([group_order[g] * ratio + _perm(ratio, gen) for g in range(groups)])
    inside = [_perm(head_dim, gen) for _ in range(groups)]  # value dims, per new group
    values = torch.cat([group_order[g] * head_dim + inside[g] for g in range(groups)])
    # the output projection reads per query head the values of its group
    attn = torch.cat([query_order[h] * head_dim + inside[h // ratio] for h in range(heads)])
    state.vector("embed_tokens", res)
    for i in range(config.num_hidden_layers):
        layer, mlp = f"layers.{i}", _perm(config.intermediate_size, gen)
        state.vector(f"{layer}.input_layernorm", res)
        state.vector(f"{layer}.post_attention_layernorm", res)
        state.linear(f"{layer}.self_attn.q_proj", whole_heads(query_order, head_dim), res)
        state.linear(f"{layer}.self_attn.k_proj", whole_heads(group_order, head_dim), res)
        state.linear(f"{layer}.self_attn.v_proj", values, res)
        state.linear(f"{layer}.self_attn.o_proj", res, attn)
        state.linear(f"{layer}.mlp.gate_proj", mlp, res)
        state.linear(f"{layer}.mlp.up_proj", mlp, res)
        state.linear(f"{layer}.mlp.down_proj", res, mlp)
    state.vector("norm", res)
    state.linear("lm_head", inp=res, base=False)


def widened_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A Llama computing the same function at twice the hidden and MLP widths: every
    residual and MLP neuron duplicated (RMSNorm's mean square does not change), and weights
    reading a duplicated axis halved. Heads and head_dim stay."""
    config = model.config.to_dict()
    config.update(hidden_size=2 * model.config.hidden_size)
    config.update(intermediate_size=2 * model.config.intermediate_size)
    wide = type(model)(type(model.config).from_dict(config)).eval()

    def twice(tensor, *axes, reads=None):
        for axis in axes:
            tensor = tensor.repeat_interleave(2, dim=axis)
        return tensor / 2 if reads is not None else tensor

    state = {}
    for key, tensor in model.state_dict().items():
        if key.endswith(("norm.weight", "o_proj.weight", "o_proj.bias", "down_proj.bias")):
            state[key] = twice(tensor, 0)  # writes into the stream
        elif "embed_tokens" in key:
            state[key] = twice(tensor, 1)
        elif key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "lm_head.weight")):
            state[key] = twice(tensor, 1, reads=1)
        elif key.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")):
            state[key] = twice(tensor, 0, 1, reads=1)  # MLP neurons and stream, both doubled
        else:
            state[key] = tensor
    wide.load_state_dict(state)
    return wide


def widened_vit_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A ViT computing the same function at twice the hidden and MLP widths: every stream,
    MLP and attention neuron duplicated (LayerNorm's mean and variance do not change; the
    heads stay, so head_dim doubles), weights reading a duplicated axis halved, and queries
    scaled by 1/sqrt(2): q.k sums twice the terms and is divided by sqrt(2 head_dim)."""
    config = model.config.to_dict()
    config.update(
        hidden_size=2 * model.config.hidden_size,
        intermediate_size=2 * model.config.intermediate_size,
    )
    wide = type(model)(type(model.config).from_dict(config)).eval()

    def twice(tensor, *axes, reads=None):
        for axis in axes:
            tensor = tensor.repeat_interleave(2, dim=axis)
        return tensor / 2 if reads is not None else tensor

    state = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("classifier.bias"):
            state[key] = tensor
        elif key.endswith("classifier.weight"):
            state[key] = twice(tensor, 1, reads=1)
        elif key.endswith(("cls_token", "position_embeddings")):
            state[key] = twice(tensor, 2)
        elif tensor.ndim == 2 and "embeddings" not in key:
            state[key] = twice(tensor, 0, 1, reads=1)  # every linear: outputs and inputs
        else:
            state[key] = twice(tensor, 0)  # biases, LayerNorms, the patch projection: outputs
        if "q_proj" in key:
            state[key] = state[key] / 2**0.5
    wide.load_state_dict(state)
    return wide


def _permute_gpt2(state: _State, config, gen: torch.Generator) -> None:
    hidden, heads = config.n_embd, config.n_head
    head_dim = hidden // heads
    res = _perm(hidden, gen)
    state.vector("wte", res)
    state.vector("wpe", res)
    for i in range(config.n_layer):
        layer = f"h.{i}"
        qk, values = _qk_and_values(heads, head_dim, gen)
        mlp = _perm(config.n_inner or 4 * hidden, gen)
        state.vector(f"{layer}.ln_1", res)
        state.vector(f"{layer}.ln_2", res)
        fused = torch.cat([qk, hidden + qk, 2 * hidden + values])  # c_attn: [Q | K | V]
        state.linear(f"{layer}.attn.c_attn", fused, res, conv1d=True)
        state.linear(f"{layer}.attn.c_proj", res, values, conv1d=True)
        state.linear(f"{layer}.mlp.c_fc", mlp, res, conv1d=True)
        state.linear(f"{layer}.mlp.c_proj", res, mlp, conv1d=True)
    state.vector("ln_f", res)
    state.linear("lm_head", inp=res, base=False)


def _qk_and_values(heads: int, head_dim: int, gen: torch.Generator):
    """One map for Q and K (heads and the dims inside them), the same head order for V with
    its own dims inside each head."""
    qk = head_perm(heads, head_dim, gen)
    order = qk.view(heads, head_dim)[:, 0] // head_dim
    values = torch.cat([order[h] * head_dim + _perm(head_dim, gen) for h in range(heads)])
    return qk, values


def _permute_encoder(state: _State, config, gen: torch.Generator) -> None:
    """BERT, RoBERTa / XLM-R, DistilBERT and ViT (their module names differ, not the shape)."""
    hidden = getattr(config, "hidden_size", None) or config.dim
    heads = getattr(config, "num_attention_heads", None) or config.n_heads
    head_dim = hidden // heads
    res = _perm(hidden, gen)
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        state.vector(f"embeddings.{table}", res)
    state.vector("embeddings.LayerNorm", res)
    state.take("embeddings.cls_token", 2, res)  # ViT
    state.take("embeddings.position_embeddings", 2, res)
    state.linear("embeddings.patch_embeddings.projection", out=res)
    for i in range(
        config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layers
    ):
        names = _layer_keys(state, i)
        qk, values = _qk_and_values(heads, head_dim, gen)
        mlp = _perm(getattr(config, "intermediate_size", None) or config.hidden_dim, gen)
        state.linear(names["query"], qk, res)
        state.linear(names["key"], qk, res)
        state.linear(names["value"], values, res)
        state.linear(names["attn_out"], res, values)
        state.linear(names["fc1"], mlp, res)
        state.linear(names["fc2"], res, mlp)
        for norm in names["norms"]:
            state.vector(norm, res)
    state.vector("layernorm", res)  # ViT's final norm
    pool = _perm(hidden, gen)
    state.linear("pooler.dense", pool, res)
    if state.prefix in ("vit.",):
        state.linear("classifier", inp=res, base=False)
    else:  # BERT's classifier reads the pooler; RoBERTa's and DistilBERT's their own dense
        state.linear("classifier", inp=pool, base=False)
    state.linear("classifier.dense", pool, res, base=False)
    state.linear("classifier.out_proj", inp=pool, base=False)
    state.linear("pre_classifier", pool, res, base=False)
    # MLM heads: the transform writes into the embedding space, read by the tied decoder
    for transform, norm, decoder in (
        (
            "cls.predictions.transform.dense",
            "cls.predictions.transform.LayerNorm",
            "cls.predictions.decoder",
        ),
        ("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder"),
        ("vocab_transform", "vocab_layer_norm", "vocab_projector"),
    ):
        state.linear(transform, res, res, base=False)
        state.vector(norm, res, base=False)
        state.linear(decoder, inp=res, base=False)


def _layer_keys(state: _State, i: int) -> dict:
    """Module names of encoder layer i, by the names the model really has."""
    p = state.prefix
    if f"{p}transformer.layer.{i}.attention.q_lin.weight" in state.tensors:  # DistilBERT
        base = f"transformer.layer.{i}."
        names = ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin")
        names += ("ffn.lin1", "ffn.lin2", "sa_layer_norm", "output_layer_norm")
    elif f"{p}encoder.layer.{i}.attention.self.query.weight" in state.tensors:  # BERT, RoBERTa
        base = f"encoder.layer.{i}."
        names = ("attention.self.query", "attention.self.key", "attention.self.value")
        names += ("attention.output.dense", "intermediate.dense", "output.dense")
        names += ("attention.output.LayerNorm", "output.LayerNorm")
    elif f"{p}encoder.layer.{i}.attention.attention.query.weight" in state.tensors:  # ViT, tf 4
        base = f"encoder.layer.{i}."
        names = ("attention.attention.query", "attention.attention.key")
        names += ("attention.attention.value", "attention.output.dense")
        names += ("intermediate.dense", "output.dense", "layernorm_before", "layernorm_after")
    else:  # ViT, transformers 5 module names
        base = f"layers.{i}."
        names = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
        names += ("mlp.fc1", "mlp.fc2", "layernorm_before", "layernorm_after")
    full = [base + n for n in names]
    keys = dict(zip(("query", "key", "value", "attn_out", "fc1", "fc2"), full, strict=False))
    return {**keys, "norms": full[6:]}


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
