"""The shapes a config implies, derived from the family descriptions, against transformers'
own models: the derivation replaces building the model at fusion time, so it must agree
with transformers for every family and the config switches that change shapes."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import transformers

from fusion_core.compat import ModelRoles, canonical_keys, expected_shapes
from fusion_core.errors import InputError
from fusion_core.families import Family, resolve_family
from fusion_core.limits import check_config_matches_tensors

TEXT = dict(vocab_size=101, max_position_embeddings=40)
BERT_LIKE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
LLAMA_LIKE = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=96, **TEXT
)
CASES = [
    ("BertModel", dict(BERT_LIKE, type_vocab_size=3, **TEXT)),
    ("BertForSequenceClassification", dict(BERT_LIKE, num_labels=3, **TEXT)),
    ("BertForMaskedLM", dict(BERT_LIKE, **TEXT)),
    ("RobertaForSequenceClassification", dict(BERT_LIKE, num_labels=5, **TEXT)),
    ("XLMRobertaForMaskedLM", dict(BERT_LIKE, **TEXT)),
    (
        "DistilBertForSequenceClassification",
        dict(dim=64, hidden_dim=96, n_heads=4, n_layers=2, **TEXT),
    ),
    ("DistilBertForMaskedLM", dict(dim=64, hidden_dim=96, n_heads=4, n_layers=2, **TEXT)),
    ("GPT2LMHeadModel", dict(n_embd=64, n_head=4, n_layer=2, n_positions=40, vocab_size=101)),
    ("GPT2Model", dict(n_embd=64, n_head=4, n_layer=2, n_inner=80, vocab_size=101)),
    ("LlamaForCausalLM", dict(LLAMA_LIKE, num_key_value_heads=2, tie_word_embeddings=False)),
    ("LlamaForCausalLM", dict(LLAMA_LIKE, head_dim=16, attention_bias=True, mlp_bias=True)),
    ("LlamaModel", dict(LLAMA_LIKE)),
    ("MistralForCausalLM", dict(LLAMA_LIKE, num_key_value_heads=4, head_dim=4)),
    ("Qwen2ForCausalLM", dict(LLAMA_LIKE, num_key_value_heads=2, tie_word_embeddings=True)),
    ("ViTModel", dict(BERT_LIKE, image_size=32, patch_size=8, num_channels=3)),
    ("ViTForImageClassification", dict(BERT_LIKE, image_size=30, patch_size=6, num_labels=7)),
]


@dataclass
class Skeleton(ModelRoles):
    """A model as its config and a state dict's shapes describe it."""

    family: Family
    architecture: str
    config_dict: dict
    shapes: dict[str, tuple]
    index: int = 0

    def __post_init__(self) -> None:
        self.keys = canonical_keys(self.family, self.shapes, "skeleton")

    @property
    def label(self) -> str:
        return "skeleton"

    @property
    def config(self) -> dict:
        return self.config_dict

    def shape(self, name: str) -> tuple:
        return self.shapes[self.keys[name]]


def saved(architecture: str, values: dict) -> tuple[dict, dict[str, tuple]]:
    """config.json as save_pretrained writes it, and the shapes of the model it builds."""
    model_class = getattr(transformers, architecture)
    config = model_class.config_class(**values)
    config.architectures = [architecture]
    with torch.device("meta"):
        model = model_class(config)
    shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    return json.loads(config.to_json_string(use_diff=True)), shapes


def skeleton(config: dict, shapes: dict[str, tuple]) -> Skeleton:
    family, architecture = resolve_family(config)
    return Skeleton(family, architecture, config, shapes)


def graph(model: Skeleton):
    return [n for _, n in model.family.nodes(model.architecture, model.config_value("layers"))]


@pytest.mark.parametrize("architecture,values", CASES, ids=[c[0] for c in CASES])
def test_the_description_implies_the_shapes_transformers_builds(architecture, values):
    config, shapes = saved(architecture, values)
    model = skeleton(config, shapes)
    implied, open_names = expected_shapes(model, graph(model))
    assert open_names == []
    built = {name: model.shape(name) for name in implied}
    assert implied == built
    fused_here = {p.name for n in graph(model) if hasattr(n, "params") for p in n.params}
    assert set(implied) == fused_here & set(model.keys)  # every stored parameter covered
    check_config_matches_tensors(model)


@pytest.mark.parametrize(
    "architecture,values,key,value",
    [
        ("BertForMaskedLM", dict(BERT_LIKE, **TEXT), "intermediate_size", 80),
        (
            "BertForSequenceClassification",
            dict(BERT_LIKE, num_labels=3, **TEXT),
            "id2label",
            {"0": "a"},
        ),
        ("LlamaForCausalLM", dict(LLAMA_LIKE, num_key_value_heads=2), "num_key_value_heads", 4),
        ("LlamaForCausalLM", dict(LLAMA_LIKE), "head_dim", 16),
        ("GPT2Model", dict(n_embd=64, n_head=4, n_layer=2), "n_inner", 128),
        ("ViTModel", dict(BERT_LIKE, image_size=32, patch_size=8), "image_size", 40),
        ("DistilBertModel", dict(dim=64, hidden_dim=96, n_heads=4, n_layers=2), "vocab_size", 7),
    ],
)
def test_a_config_contradicting_its_tensors_is_refused(architecture, values, key, value):
    config, shapes = saved(architecture, values)
    config[key] = value
    with pytest.raises(InputError, match=r"config\.json implies"):
        check_config_matches_tensors(skeleton(config, shapes))


def test_a_size_left_to_library_defaults_is_settled_by_transformers():
    """A config.json without `type_vocab_size` gets BertConfig's default of 2: the
    derivation leaves that table open, and building transformers' model settles it."""
    config, shapes = saved("BertModel", dict(BERT_LIKE, **TEXT))
    del config["type_vocab_size"]
    model = skeleton(config, shapes)
    _, open_names = expected_shapes(model, graph(model))
    assert open_names == ["embeddings.token_type_embeddings.weight"]
    check_config_matches_tensors(model)
    wrong = {**shapes, "embeddings.token_type_embeddings.weight": (3, 64)}
    with pytest.raises(InputError, match="token_type_embeddings"):
        check_config_matches_tensors(skeleton(config, wrong))


@pytest.mark.parametrize("value", [0, -4, 2.5, "64", True])
def test_a_size_no_model_could_have_is_refused(value):
    config, shapes = saved("LlamaForCausalLM", dict(LLAMA_LIKE))
    config["head_dim"] = value
    with pytest.raises(InputError, match="head_dim"):
        check_config_matches_tensors(skeleton(config, shapes))
