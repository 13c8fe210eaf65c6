"""BERT (post-LN encoder): BertModel, BertForMaskedLM, BertForSequenceClassification."""

from .base import Family, Layer, Merge, Param, Tap, linear, norm

L = "encoder.layer.{i}"

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
    embeddings=(
        Layer(
            (
                Param("embeddings.word_embeddings.weight", (None, ("out", "res.0"))),
                Param("embeddings.position_embeddings.weight", (None, ("out", "res.0"))),
                Param("embeddings.token_type_embeddings.weight", (None, ("out", "res.0"))),
            ),
            defines="res.0",
            tap=Tap("in", "embeddings.LayerNorm"),
        ),
        norm("embeddings.LayerNorm", "res.0"),
    ),
    layer=(
        linear(
            f"{L}.attention.self.query",
            ("out", "q.{i}"),
            ("in", "res.{i}"),
            "q.{i}",
            qk="qk.{i}",
            heads=True,
        ),
        linear(
            f"{L}.attention.self.key",
            ("out", "k.{i}"),
            ("in", "res.{i}"),
            "k.{i}",
            qk="qk.{i}",
            heads=True,
        ),
        linear(
            f"{L}.attention.self.value", ("out", "v.{i}"), ("in", "res.{i}"), "v.{i}", heads=True
        ),
        linear(f"{L}.attention.output.dense", ("out", "ao.{i}"), ("in", "v.{i}"), "ao.{i}"),
        Merge(
            "mid.{i}",
            "res.{i}",
            "ao.{i}",
            Tap("in", f"{L}.attention.self.query"),
            Tap("out", f"{L}.attention.output.dense"),
        ),
        norm(f"{L}.attention.output.LayerNorm", "mid.{i}"),
        linear(f"{L}.intermediate.dense", ("out", "mlp.{i}"), ("in", "mid.{i}"), "mlp.{i}"),
        linear(f"{L}.output.dense", ("out", "mo.{i}"), ("in", "mlp.{i}"), "mo.{i}"),
        Merge(
            "res.{next}",
            "mid.{i}",
            "mo.{i}",
            Tap("in", f"{L}.intermediate.dense"),
            Tap("out", f"{L}.output.dense"),
        ),
        norm(f"{L}.output.LayerNorm", "res.{next}"),
    ),
    final=(),
    heads={
        "pooler": (linear("pooler.dense", ("out", "pool"), ("in", "res.{i}"), "pool"),),
        "classifier": (linear("classifier", None, ("in", "pool")),),
        # The decoder is tied to the word embeddings, so the transform writes into the
        # embedding space (res.0) rather than a space of its own.
        "mlm": (
            linear("cls.predictions.transform.dense", ("out", "res.0"), ("in", "res.{i}")),
            norm("cls.predictions.transform.LayerNorm", "res.0"),
            Layer(
                (
                    Param("cls.predictions.bias", (None,)),
                    Param(
                        "cls.predictions.decoder.weight",
                        (None, ("in", "res.0")),
                        optional=True,
                        tied_to="embeddings.word_embeddings.weight",
                    ),
                    Param(
                        "cls.predictions.decoder.bias",
                        (None,),
                        optional=True,
                        tied_to="cls.predictions.bias",
                    ),
                )
            ),
        ),
    },
    buffers=("embeddings.position_ids", "embeddings.token_type_ids"),
    inputs=("input_ids", "attention_mask", "token_type_ids"),
    token_layout="text",
    config_keys={
        "layers": "num_hidden_layers",
        "heads": "num_attention_heads",
        "hidden": "hidden_size",
        "intermediate": "intermediate_size",
    },
)
