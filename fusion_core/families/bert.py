"""BERT (post-LN encoder): BertModel, BertForMaskedLM, BertForSequenceClassification."""

from .base import Family, Tap, linear
from .blocks import encoder_block, mlm_head, text_embeddings

BERT = Family(
    name="bert",
    model_types=("bert",),
    base_prefix="bert.",
    architectures={
        "BertModel": ("pooler",),
        "BertForSequenceClassification": ("pooler", "classifier"),
        "BertForMaskedLM": ("mlm",),
    },
    # One embedding TM from the word, position and token-type tables together: they are
    # summed before LayerNorm, so they must share it.
    embeddings=text_embeddings(
        {
            "embeddings.word_embeddings": "vocab",
            "embeddings.position_embeddings": "positions",
            "embeddings.token_type_embeddings": "token_types",
        },
        Tap("in", "embeddings.LayerNorm"),
        "embeddings.LayerNorm",
    ),
    layer=encoder_block(
        "encoder.layer.{i}",
        (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ),
        ("attention.output.LayerNorm", "output.LayerNorm"),
        pre_norm=False,
    ),
    final=(),
    heads={
        "pooler": (linear("pooler.dense", ("out", "pool"), ("in", "res.{i}"), "pool"),),
        "classifier": (linear("classifier", None, ("in", "pool"), extent="labels"),),
        "mlm": mlm_head(
            "cls.predictions.transform.dense",
            "cls.predictions.transform.LayerNorm",
            "cls.predictions.decoder",
            "embeddings.word_embeddings.weight",
            bias="cls.predictions.bias",
        ),
    },
    buffers=("embeddings.position_ids", "embeddings.token_type_ids"),
    inputs=("input_ids", "attention_mask", "token_type_ids"),
    token_layout="text",
    config_keys={"layers": "num_hidden_layers", "heads": "num_attention_heads"},
    size_keys={
        "hidden": "hidden_size",
        "mlp": "intermediate_size",
        "vocab": "vocab_size",
        "positions": "max_position_embeddings",
        "token_types": "type_vocab_size",
    },
)
