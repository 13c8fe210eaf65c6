"""Llama and the families written as a few lines over it (like transformers' modular files):
Mistral (Llama's layout under another name) and Qwen2 (plus Q/K/V biases).

RMSNorm, rotary grouped-query attention, SwiGLU MLP, an `lm_head` tied to the token
embeddings or not (`tie_word_embeddings`). A config's `head_dim` may differ from
hidden / heads: head widths are read from the tensors' shapes."""

from dataclasses import replace

from .base import Family, Tap, rms_norm
from .blocks import decoder_block, lm_head, text_embeddings

LLAMA = Family(
    name="llama",
    model_types=("llama",),
    base_prefix="model.",
    architectures={"LlamaModel": (), "LlamaForCausalLM": ("lm",)},
    embeddings=text_embeddings({"embed_tokens": "vocab"}, Tap("out", "embed_tokens")),
    layer=decoder_block(),
    final=(rms_norm("norm", "res.{i}"),),
    heads={"lm": lm_head("embed_tokens.weight")},
    buffers=("layers.{i}.self_attn.rotary_emb.inv_freq",),  # stored by early conversions
    inputs=("input_ids", "attention_mask"),
    config_keys={
        "layers": "num_hidden_layers",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
    },
    tie_default=False,
    size_keys={
        "hidden": "hidden_size",
        "mlp": "intermediate_size",
        "head_dim": "head_dim",  # null or absent: hidden / heads
        "vocab": "vocab_size",
    },
)

MISTRAL = replace(
    LLAMA,
    name="mistral",
    model_types=("mistral",),
    architectures={"MistralModel": (), "MistralForCausalLM": ("lm",)},
)

QWEN2 = replace(
    LLAMA,
    name="qwen2",
    model_types=("qwen2",),
    architectures={"Qwen2Model": (), "Qwen2ForCausalLM": ("lm",)},
    layer=decoder_block(qkv_bias=True, output_bias=False, mlp_bias=False),
)
