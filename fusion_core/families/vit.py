"""ViT (pre-LN encoder): ViTModel, ViTForImageClassification.

Canonical names are the ones published checkpoints carry; transformers 5 saves
`layers.{i}.attention.q_proj`-style names, mapped onto them by `renames`.
"""

from .base import Family, Layer, Merge, Param, Tap, linear, norm
from .blocks import encoder_block
from .sizes import vit_positions

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
                    extents=("channels", "patch_size", "patch_size"),
                ),
                Param("embeddings.patch_embeddings.projection.bias", (("out", "patch"),)),
            ),
            defines="patch",
            tap=Tap("out", "embeddings.patch_embeddings.projection"),
        ),
        Layer((Param("embeddings.cls_token", (None, None, ("out", "patch")), extents=(1, 1)),)),
        Layer(
            (
                Param(
                    "embeddings.position_embeddings",
                    (None, None, ("out", "pos")),
                    extents=(1, "positions"),  # the patches and the class token
                ),
            ),
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
    layer=encoder_block(
        "encoder.layer.{i}",
        (
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ),
        ("layernorm_before", "layernorm_after"),
        pre_norm=True,
    ),
    final=(norm("layernorm", "res.{i}"),),
    heads={
        "pooler": (linear("pooler.dense", ("out", "pool"), ("in", "res.{i}"), "pool"),),
        "classifier": (linear("classifier", None, ("in", "res.{i}"), extent="labels"),),
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
    config_keys={"layers": "num_hidden_layers", "heads": "num_attention_heads"},
    size_keys={"hidden": "hidden_size", "mlp": "intermediate_size", "channels": "num_channels"},
    derive_sizes=vit_positions,
)
