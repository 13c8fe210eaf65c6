"""Whether models can be fused together, from their configs and tensor shapes alone (no torch
here: `otfuse plan` and the API answer it from config.json and safetensors headers).

`ModelRoles` is what these rules read of a model: the engine's `ParentModel` (a lazy
checkpoint) and the planner's `HeaderModel` (headers only) both carry it.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import IncompatibleModelsError, InputError
from .families import Attention, Family, Layer, Node, Param, axis_spaces, canonical_name
from .families.sizes import config_sizes

STREAM_REFINEMENTS = 2  # weights-based shared stream: re-solve it after the inner plans
# The smallest exact assignments `assignment.assign` gives the auction on a GPU: at ~0.2 ms
# a round (launch-bound; an estimate, no GPU has measured it yet) its ~2.4 n rounds break
# even with JV's 3.7 s at 8192 and take half of JV's time at 14336; smaller problems, such
# as BERT's batches of 3072, are faster on the host's threads.
AUCTION_MIN_N = 8192


class ModelRoles:
    """Config roles and tensor presence of a model. Needs `index`, `label`, `family`,
    `architecture`, `config`, `keys` (canonical name -> serialized key) and `shape(name)`."""

    index: int
    family: Family
    architecture: str
    keys: dict[str, str]

    @property
    def label(self) -> str:
        raise NotImplementedError

    @property
    def config(self) -> dict:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def parameter_count(self) -> int:
        raise NotImplementedError

    def config_value(self, role: str) -> int:
        key = self.family.config_keys[role]
        try:
            return int(self.config[key])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{self.label}: config.json lacks a valid {key!r}") from exc

    @property
    def kv_heads(self) -> int:
        """Key/value heads: fewer than the query heads under grouped-query attention (a
        config without the key, or with null, has as many as query heads)."""
        key = self.family.config_keys.get("kv_heads")
        if key is not None and self.config.get(key) is not None:
            return self.config_value("kv_heads")
        return self.config_value("heads")

    @property
    def ties_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", self.family.tie_default))

    def is_tied(self, param: Param) -> bool:
        """A tied copy (LM head) written as its fused source rather than fused itself."""
        return param.tied_to is not None and self.ties_embeddings

    def has(self, name: str) -> bool:
        return name in self.keys


def canonical_keys(family: Family, keys: Iterable[str], where: str) -> dict[str, str]:
    """Canonical name -> serialized key; two keys naming one tensor are refused."""
    names: dict[str, str] = {}
    for key in keys:
        name = canonical_name(family, key)
        if name in names:
            raise InputError(f"{where}: tensors {names[name]!r} and {key!r} collide")
        names[name] = key
    return names


def check_attention_policy(nodes: list[Node], spec, anchor: ModelRoles) -> None:
    """What a family's attention forbids, as one-line errors before any work is done."""
    attention = next((n for n in nodes if isinstance(n, Attention)), None)
    if attention is None or spec.method == "vanilla":
        return
    name = anchor.family.name
    if attention.rotary and spec.heads == "cross":
        raise InputError(
            f"{name} uses rotary embeddings: cross-head alignment would move dimensions "
            "between heads, which breaks them; use matched heads",
            field="heads",
        )
    if attention.rotary and spec.qk == "free":
        raise InputError(
            f"{name} uses rotary embeddings: free Q/K would align query and key dimensions "
            "inside heads, which breaks them (Q and K heads move whole); use tied Q/K",
            field="qk",
        )
    if anchor.kv_heads != anchor.config_value("heads") and not attention.rotary:
        raise InputError(f"{name}: grouped-query attention without rotary embeddings")


def check_compatible(parents: list[ModelRoles], nodes: list[Node]) -> None:
    """Everything that must agree before fusing: family, architecture, depth, heads, every
    tensor present, and the sizes of axes no TM acts on."""
    anchor = parents[0]
    for other in parents[1:]:
        if other.family is not anchor.family:
            raise IncompatibleModelsError(
                f"{other.label} is a {other.family.name} model, "
                f"{anchor.label} a {anchor.family.name} model"
            )
        if other.architecture != anchor.architecture:
            raise IncompatibleModelsError(
                f"{other.label} is a {other.architecture}, {anchor.label} a {anchor.architecture}"
            )
        for what, count in (
            ("layers", lambda p: p.config_value("layers")),
            ("attention heads", lambda p: p.config_value("heads")),
            ("key/value heads", lambda p: p.kv_heads),
        ):
            if count(other) != count(anchor):
                raise IncompatibleModelsError(
                    f"{other.label} has {count(other)} {what}, {anchor.label} has {count(anchor)}"
                )
    if anchor.kv_heads < 1 or anchor.config_value("heads") % anchor.kv_heads:
        raise InputError(
            f"{anchor.label}: {anchor.config_value('heads')} attention heads do not split into "
            f"{anchor.kv_heads} key/value groups"
        )
    covered = set(anchor.family.buffer_names(anchor.config_value("layers")))
    layers = [node for node in nodes if isinstance(node, Layer)]
    for param in (p for layer in layers for p in layer.params):
        covered.add(param.name)
        _check_param(parents, param)
    for node in nodes:
        if isinstance(node, Attention) and node.rotary:
            _check_rotary_heads(parents, node, layers)
    for parent in parents:
        unknown = sorted(set(parent.keys) - covered)
        if unknown:
            raise InputError(
                f"{parent.label}: tensor {unknown[0]!r} is not part of the "
                f"{parent.family.name} description ({len(unknown)} unknown in all)"
            )


def _check_param(parents: list[ModelRoles], param: Param) -> None:
    """Present where it is fused (a tied copy need not be), and of one size on every axis no
    TM acts on."""
    anchor = parents[0]
    if anchor.is_tied(param) or (param.optional and not anchor.has(param.name)):
        return
    for parent in parents:
        if not parent.has(param.name):
            raise InputError(f"{parent.label}: missing tensor {param.name!r}")
    a_shape = anchor.shape(param.name)
    for parent in parents[1:]:
        o_shape = parent.shape(param.name)
        if len(a_shape) != len(param.axes) or len(o_shape) != len(a_shape):
            raise InputError(
                f"{parent.label}: tensor {param.name!r} has shape {o_shape}, "
                f"expected {len(param.axes)} dimensions"
            )
        for axis, (a_size, o_size) in enumerate(zip(a_shape, o_shape, strict=True)):
            if param.axes[axis] is None and a_size != o_size:
                raise IncompatibleModelsError(
                    f"{parent.label}: tensor {param.name!r} has size {o_size} on axis "
                    f"{axis}, {anchor.label} has {a_size}; only widths may differ"
                )


def _check_rotary_heads(
    parents: list[ModelRoles], attention: Attention, layers: list[Layer]
) -> None:
    """Rotary heads are never split or resized: every model needs the anchor's head_dim."""
    query = next(p for n in layers for p in n.params if p.axes[0] == ("out", attention.query))
    anchor = parents[0]
    heads = anchor.config_value("heads")
    width = anchor.shape(query.name)[0]
    for parent in parents[1:]:
        other = parent.shape(query.name)[0]
        if other != width:
            raise IncompatibleModelsError(
                f"{parent.label} has head_dim {other // heads}, {anchor.label} has "
                f"{width // heads}; rotary attention heads cannot be resized"
            )


# Which size role each space of the flow graph has (by the name before its layer index).
SPACE_ROLES = {
    "res": "hidden",
    "mid": "hidden",
    "ao": "hidden",
    "mo": "hidden",
    "pool": "hidden",
    "patch": "hidden",
    "pos": "hidden",
    "mlp": "mlp",
    "q": "query",
    "att": "query",
    "k": "key",
    "v": "key",
}


def size_roles(model: ModelRoles) -> dict[str, int]:
    """The family's size roles of a config, plus the widths of queries and keys/values
    (heads x head_dim; head_dim is hidden / heads unless the config says otherwise)."""
    sizes = config_sizes(model.family, model.config)
    heads, hidden = sizes.get("heads"), sizes.get("hidden")
    head_dim = sizes.get("head_dim") or (hidden // heads if heads and hidden else None)
    if heads and head_dim:
        sizes["query"] = heads * head_dim
        sizes["key"] = sizes.get("kv_heads", heads) * head_dim
    return sizes


def expected_shapes(model: ModelRoles, nodes: list[Node]) -> tuple[dict[str, tuple], list[str]]:
    """The shape config.json implies for each tensor of the flow graph the model stores,
    from the family description alone (no transformers): tagged axes are as wide as their
    spaces, untagged ones as their `extents` say. Also the names whose shape the config
    leaves open (a role it does not state), for a slower check to settle."""
    sizes = size_roles(model)
    shapes: dict[str, tuple] = {}
    open_names: list[str] = []
    for param in (p for node in nodes if isinstance(node, Layer) for p in node.params):
        if not model.has(param.name):
            continue
        extents = iter(param.extents)
        shape = []
        for axis in param.axes:
            if axis is None:
                extent = next(extents, None)
                if extent is None:
                    raise ValueError(f"{model.family.name}: {param.name} lacks an extent")
                shape.append(extent if isinstance(extent, int) else sizes.get(extent))
            else:
                roles = [SPACE_ROLES[space.split(".")[0]] for space in axis_spaces(axis)]
                widths = [sizes.get(role) for role in roles]
                shape.append(None if None in widths else sum(widths))
        if None in shape:
            open_names.append(param.name)
        else:
            shapes[param.name] = tuple(shape)
    return shapes, open_names
