"""ViT (pre-LN encoder): ViTModel, ViTForImageClassification.

Canonical names are the ones published checkpoints carry; transformers 5 saves
`layers.{i}.attention.q_proj`-style names, mapped onto them by `renames`.
"""

from .base import Family, Layer, Merge, Param, Tap, linear, norm

L = "encoder.layer.{i}"

VIT = Family(
    name="vit",
    model_types=("vit",),
    base_prefix="vit.",
    architectures={
        "ViTModel": ("pooler",),
        "ViTForImageClassification": ("classifier",),
    },
    # Fig. 3: the class token follows the patch TM (it is one token of many); position
    # embeddings get their own TM and are added like a residual branch.
    embeddings=(
        Layer(
            (
                Param(
                    "embeddings.patch_embeddings.projection.weight",
                    (("out", "patch"), None, None, None),
                ),
                Param("embeddings.patch_embeddings.projection.bias", (("out", "patch"),)),
            ),
            defines="patch",
            tap=Tap("out", "embeddings.patch_embeddings.projection"),
        ),
        Layer((Param("embeddings.cls_token", (None, None, ("out", "patch"))),)),
        Layer(
            (Param("embeddings.position_embeddings", (None, None, ("out", "pos"))),),
            defines="pos",
        ),
        Merge(
            "res.0",
            "patch",
            "pos",
            Tap("out", "embeddings.patch_embeddings.projection"),
            Tap("param", "embeddings.position_embeddings"),
        ),
    ),
    layer=(
        norm(f"{L}.layernorm_before", "res.{i}"),
        linear(
            f"{L}.attention.attention.query",
            ("out", "q.{i}"),
            ("in", "res.{i}"),
            "q.{i}",
            qk="qk.{i}",
            heads=True,
        ),
        linear(
            f"{L}.attention.attention.key",
            ("out", "k.{i}"),
            ("in", "res.{i}"),
            "k.{i}",
            qk="qk.{i}",
            heads=True,
        ),
        linear(
            f"{L}.attention.attention.value",
            ("out", "v.{i}"),
            ("in", "res.{i}"),
            "v.{i}",
            heads=True,
        ),
        linear(f"{L}.attention.output.dense", ("out", "ao.{i}"), ("in", "v.{i}"), "ao.{i}"),
        Merge(
            "mid.{i}",
            "res.{i}",
            "ao.{i}",
            Tap("in", f"{L}.layernorm_before"),
            Tap("out", f"{L}.attention.output.dense"),
        ),
        norm(f"{L}.layernorm_after", "mid.{i}"),
        linear(f"{L}.intermediate.dense", ("out", "mlp.{i}"), ("in", "mid.{i}"), "mlp.{i}"),
        linear(f"{L}.output.dense", ("out", "mo.{i}"), ("in", "mlp.{i}"), "mo.{i}"),
        Merge(
            "res.{next}",
            "mid.{i}",
            "mo.{i}",
            Tap("in", f"{L}.layernorm_after"),
            Tap("out", f"{L}.output.dense"),
        ),
    ),
    final=(norm("layernorm", "res.{i}"),),
    heads={
        "pooler": (linear("pooler.dense", ("out", "pool"), ("in", "res.{i}"), "pool"),),
        "classifier": (linear("classifier", None, ("in", "res.{i}")),),
    },
    renames=(
        (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
        (r"\.attention\.q_proj\.", ".attention.attention.query."),
        (r"\.attention\.k_proj\.", ".attention.attention.key."),
        (r"\.attention\.v_proj\.", ".attention.attention.value."),
        (r"\.attention\.o_proj\.", ".attention.output.dense."),
        (r"\.mlp\.fc1\.", ".intermediate.dense."),
        (r"\.mlp\.fc2\.", ".output.dense."),
    ),
    inputs=("pixel_values",),
    token_layout="vision",
    config_keys={
        "layers": "num_hidden_layers",
        "heads": "num_attention_heads",
        "hidden": "hidden_size",
        "intermediate": "intermediate_size",
    },
)
