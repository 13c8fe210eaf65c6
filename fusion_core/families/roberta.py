"""RoBERTa and XLM-R: BERT's encoder under a `roberta.` prefix, with their own task heads."""

from dataclasses import replace

from .base import linear
from .bert import BERT
from .blocks import mlm_head

ROBERTA = replace(
    BERT,
    name="roberta",
    model_types=("roberta", "xlm-roberta"),
    base_prefix="roberta.",
    architectures={
        f"{prefix}{task}": heads
        for prefix in ("Roberta", "XLMRoberta")
        for task, heads in (
            ("Model", ("pooler",)),
            ("ForSequenceClassification", ("classifier",)),
            ("ForMaskedLM", ("mlm",)),
        )
    },
    heads={
        "pooler": BERT.heads["pooler"],
        # dense + tanh on the first token, then the projection to the labels
        "classifier": (
            linear("classifier.dense", ("out", "pool"), ("in", "res.{i}"), "pool"),
            linear("classifier.out_proj", None, ("in", "pool"), extent="labels"),
        ),
        "mlm": mlm_head(
            "lm_head.dense",
            "lm_head.layer_norm",
            "lm_head.decoder",
            "embeddings.word_embeddings.weight",
            bias="lm_head.bias",
        ),
    },
)
