"""GPT-2 (pre-LN decoder with Conv1D weights stored (in, out)): GPT2Model, GPT2LMHeadModel.

The fused `c_attn` projection's output axis is Q, K and V in three equal parts; the causal
masks stored per layer by older checkpoints (`attn.bias`, `attn.masked_bias`) are copied."""

from .base import Family, Tap, conv1d, norm
from .blocks import fused_attention, lm_head, mlp, pre_norm_block, text_embeddings
from .sizes import gpt2_mlp

H = "h.{i}"

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    base_prefix="transformer.",
    architectures={"GPT2Model": (), "GPT2LMHeadModel": ("lm",)},
    embeddings=text_embeddings({"wte": "vocab", "wpe": "positions"}, Tap("in", "h.0.ln_1")),
    layer=pre_norm_block(
        fused_attention(f"{H}.attn.c_attn", f"{H}.attn.c_proj"),
        mlp(f"{H}.mlp.c_fc", f"{H}.mlp.c_proj", layer=conv1d),
        (f"{H}.ln_1", f"{H}.ln_2"),
    ),
    final=(norm("ln_f", "res.{i}"),),
    heads={"lm": lm_head("wte.weight")},
    buffers=(f"{H}.attn.bias", f"{H}.attn.masked_bias"),
    inputs=("input_ids", "attention_mask"),
    config_keys={"layers": "n_layer", "heads": "n_head"},
    size_keys={
        "hidden": "n_embd",
        "mlp": "n_inner",
        "vocab": "vocab_size",
        "positions": "n_positions",
    },
    derive_sizes=gpt2_mlp,
)
