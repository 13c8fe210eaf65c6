"""DistilBERT (post-LN encoder, no token types): DistilBertModel, DistilBertForMaskedLM,
DistilBertForSequenceClassification."""

from .base import Family, Tap, linear
from .blocks import encoder_block, mlm_head, text_embeddings

DISTILBERT = Family(
    name="distilbert",
    model_types=("distilbert",),
    base_prefix="distilbert.",
    architectures={
        "DistilBertModel": (),
        "DistilBertForSequenceClassification": ("classifier",),
        "DistilBertForMaskedLM": ("mlm",),
    },
    embeddings=text_embeddings(
        {"embeddings.word_embeddings": "vocab", "embeddings.position_embeddings": "positions"},
        Tap("in", "embeddings.LayerNorm"),
        "embeddings.LayerNorm",
    ),
    layer=encoder_block(
        "transformer.layer.{i}",
        (
            "attention.q_lin",
            "attention.k_lin",
            "attention.v_lin",
            "attention.out_lin",
            "ffn.lin1",
            "ffn.lin2",
        ),
        ("sa_layer_norm", "output_layer_norm"),
        pre_norm=False,
    ),
    final=(),
    heads={
        "classifier": (
            linear("pre_classifier", ("out", "pool"), ("in", "res.{i}"), "pool"),
            linear("classifier", None, ("in", "pool"), extent="labels"),
        ),
        "mlm": mlm_head(
            "vocab_transform",
            "vocab_layer_norm",
            "vocab_projector",
            "embeddings.word_embeddings.weight",
        ),
    },
    buffers=("embeddings.position_ids",),
    inputs=("input_ids", "attention_mask"),
    config_keys={"layers": "n_layers", "heads": "n_heads"},
    size_keys={
        "hidden": "dim",
        "mlp": "hidden_dim",
        "vocab": "vocab_size",
        "positions": "max_position_embeddings",
    },
)
