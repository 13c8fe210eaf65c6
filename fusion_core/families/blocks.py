"""Building blocks shared by the family descriptions: attention and MLP branches, the
pre-norm and post-norm residual blocks built from them, text embeddings and the MLM head.

Every block uses the same space names, so the pieces fit together:
`res.{i}` (the residual stream entering layer i), `q.{i}`, `k.{i}`, `v.{i}` (queries, keys,
values), `att.{i}` (what the attention output projection reads), `ao.{i}` (its output),
`mid.{i}` (the stream after the attention addition), `mlp.{i}` (MLP neurons), `mo.{i}` (the
MLP output) and `res.{next}`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .base import Attention, Layer, Merge, Node, Param, Tap, conv1d, linear, norm, rms_norm

Nodes = tuple[Node, ...]
Bias = bool | Literal["optional"]

ATTENTION = Attention("q.{i}", "k.{i}", "v.{i}", "att.{i}")
ROTARY_ATTENTION = Attention("q.{i}", "k.{i}", "v.{i}", "att.{i}", rotary=True)


@dataclass(frozen=True)
class Branch:
    """A residual branch: its nodes, the module reading the branch's input and the module
    writing its output (where the activations of the residual addition are tapped)."""

    nodes: Nodes
    reads: str
    writes: str


def attention(
    query: str,
    key: str,
    value: str,
    output: str,
    heads: Attention = ATTENTION,
    qkv_bias: Bias = True,
    output_bias: Bias = True,
) -> Branch:
    """Separate Q, K, V projections of `res.{i}` and an output projection into `ao.{i}`."""
    nodes = (
        heads,
        linear(query, ("out", "q.{i}"), ("in", "res.{i}"), "q.{i}", bias=qkv_bias),
        linear(key, ("out", "k.{i}"), ("in", "res.{i}"), "k.{i}", bias=qkv_bias),
        linear(value, ("out", "v.{i}"), ("in", "res.{i}"), "v.{i}", bias=qkv_bias),
        linear(output, ("out", "ao.{i}"), ("in", "att.{i}"), "ao.{i}", bias=output_bias),
    )
    return Branch(nodes, query, output)


def fused_attention(qkv: str, output: str) -> Branch:
    """GPT-2: one Conv1D projects to Q, K and V at once (three equal parts of its output)."""
    spaces = ("q.{i}", "k.{i}", "v.{i}")
    nodes = (
        ATTENTION,
        conv1d(qkv, ("out", spaces), ("in", "res.{i}"), spaces),
        conv1d(output, ("out", "ao.{i}"), ("in", "att.{i}"), "ao.{i}"),
    )
    return Branch(nodes, qkv, output)


def mlp(fc_in: str, fc_out: str, layer: Callable[..., Layer] = linear) -> Branch:
    """Two dense layers, `mid.{i}` -> `mlp.{i}` -> `mo.{i}` (`conv1d` for GPT-2)."""
    nodes = (
        layer(fc_in, ("out", "mlp.{i}"), ("in", "mid.{i}"), "mlp.{i}"),
        layer(fc_out, ("out", "mo.{i}"), ("in", "mlp.{i}"), "mo.{i}"),
    )
    return Branch(nodes, fc_in, fc_out)


def gated_mlp(gate: str, up: str, down: str, bias: Bias = False) -> Branch:
    """SwiGLU: act(gate(x)) * up(x) -> down. Gate and up share one neuron map (their rows
    are one neuron's features together); the neuron's activation is down's input."""
    rows = [Param(f"{m}.weight", (("out", "mlp.{i}"), ("in", "mid.{i}"))) for m in (gate, up)]
    if bias:
        rows += [Param(f"{m}.bias", (("out", "mlp.{i}"),), bias == "optional") for m in (gate, up)]
    nodes = (
        Layer(tuple(rows), "mlp.{i}", Tap("in", down)),
        linear(down, ("out", "mo.{i}"), ("in", "mlp.{i}"), "mo.{i}", bias=bias),
    )
    return Branch(nodes, gate, down)


def pre_norm_block(
    attn: Branch, ffn: Branch, norms: tuple[str, str], norm_layer: Callable = norm
) -> Nodes:
    """x + attn(norm1(x)), then + mlp(norm2(.)) (ViT, GPT-2, Llama)."""
    return (
        norm_layer(norms[0], "res.{i}"),
        *attn.nodes,
        Merge("mid.{i}", "res.{i}", "ao.{i}", Tap("in", norms[0]), Tap("out", attn.writes)),
        norm_layer(norms[1], "mid.{i}"),
        *ffn.nodes,
        Merge("res.{next}", "mid.{i}", "mo.{i}", Tap("in", norms[1]), Tap("out", ffn.writes)),
    )


def post_norm_block(attn: Branch, ffn: Branch, norms: tuple[str, str]) -> Nodes:
    """norm1(x + attn(x)), then norm2(. + mlp(.)) (BERT, RoBERTa, DistilBERT)."""
    return (
        *attn.nodes,
        Merge("mid.{i}", "res.{i}", "ao.{i}", Tap("in", attn.reads), Tap("out", attn.writes)),
        norm(norms[0], "mid.{i}"),
        *ffn.nodes,
        Merge("res.{next}", "mid.{i}", "mo.{i}", Tap("in", ffn.reads), Tap("out", ffn.writes)),
        norm(norms[1], "res.{next}"),
    )


def encoder_block(
    prefix: str,
    names: tuple[str, str, str, str, str, str],
    norms: tuple[str, str],
    pre_norm: bool,
) -> Nodes:
    """A BERT-style block: `names` are the query, key, value, attention output, MLP in and
    MLP out modules, relative to `prefix` like `norms`."""
    q, k, v, o, fc_in, fc_out = (f"{prefix}.{n}" for n in names)
    attn, ffn = attention(q, k, v, o), mlp(fc_in, fc_out)
    norm_paths = (f"{prefix}.{norms[0]}", f"{prefix}.{norms[1]}")
    return (
        pre_norm_block(attn, ffn, norm_paths)
        if pre_norm
        else post_norm_block(attn, ffn, norm_paths)
    )


def text_embeddings(tables: dict[str, str], tap: Tap, layer_norm: str | None = None) -> Nodes:
    """Token (and position, token-type) tables summed into `res.0`: they must share one TM.
    `tables`: module -> the size role of its rows ("vocab", "positions", "token_types")."""
    params = tuple(
        Param(f"{t}.weight", (None, ("out", "res.0")), extents=(rows,))
        for t, rows in tables.items()
    )
    nodes: Nodes = (Layer(params, "res.0", tap),)
    return (*nodes, norm(layer_norm, "res.0")) if layer_norm else nodes


def mlm_head(
    transform: str, layer_norm: str, decoder: str, embeddings: str, bias: str | None = None
) -> Nodes:
    """Transform, LayerNorm and a decoder tied to the word embeddings. The transform writes
    into the embedding space (res.0), which the tied decoder reads. The vocabulary bias is
    the decoder's own (DistilBERT) or a head-level `bias` that a stored decoder bias repeats
    (BERT's `cls.predictions.bias`, RoBERTa's `lm_head.bias`)."""
    vocab = ("vocab",)
    if bias is None:
        biases = (Param(f"{decoder}.bias", (None,), extents=vocab),)
    else:
        biases = (
            Param(bias, (None,), extents=vocab),
            Param(f"{decoder}.bias", (None,), True, bias, vocab),
        )
    decoder_weight = Param(f"{decoder}.weight", (None, ("in", "res.0")), True, embeddings, vocab)
    return (
        linear(transform, ("out", "res.0"), ("in", "res.{i}")),
        norm(layer_norm, "res.0"),
        Layer((decoder_weight, *biases)),
    )


def decoder_block(
    qkv_bias: Bias = "optional", output_bias: Bias = "optional", mlp_bias: Bias = "optional"
) -> Nodes:
    """A Llama-style block: RMSNorm before rotary (grouped-query) attention and a SwiGLU MLP,
    under Llama's module names (Mistral and Qwen2 share them). Biases: Llama's are config
    switches (`attention_bias`, `mlp_bias`), Qwen2 has Q/K/V biases only."""
    p = "layers.{i}"
    attn = attention(
        f"{p}.self_attn.q_proj",
        f"{p}.self_attn.k_proj",
        f"{p}.self_attn.v_proj",
        f"{p}.self_attn.o_proj",
        heads=ROTARY_ATTENTION,
        qkv_bias=qkv_bias,
        output_bias=output_bias,
    )
    ffn = gated_mlp(f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj", f"{p}.mlp.down_proj", mlp_bias)
    return pre_norm_block(
        attn, ffn, (f"{p}.input_layernorm", f"{p}.post_attention_layernorm"), rms_norm
    )


def lm_head(embeddings: str) -> Nodes:
    """A causal LM's output projection from the final stream; tied to the token embeddings
    when the config says so (then usually not stored)."""
    weight = Param("lm_head.weight", (None, ("in", "res.{i}")), True, embeddings, ("vocab",))
    return (Layer((weight,)),)
