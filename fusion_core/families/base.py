"""The vocabulary a family description is written in.

A description lists, in forward order, the *nodes* of a transport-map (TM) flow graph over
serialized tensor names (sec. 4.1 of the paper):

- `Layer`: a group of tensors. Each tensor axis is tagged with the space (or spaces) it lives
  in. If the layer `defines` spaces, the engine computes their TMs by OT (from the tensors'
  rows or from the activations at `tap`); otherwise the tensors only follow spaces defined
  before.
- `Merge`: a residual addition. The merged space's TM combines the residual's and the
  branch's TMs by the residual policy (sec. 4.2.1), optionally weighted by the anchor's
  activations at the two taps.
- `Attention`: declares which spaces are a block's queries, keys and values, so the engine
  aligns them head by head (and keeps rotary or grouped-query attention intact).

Names carry `{i}` (layer index) and `{next}` (i + 1) placeholders, expanded per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["out", "in"]
"""`out`: the axis holds values of the space's neurons (aligned by averaging onto the anchor's
neurons); `in`: the axis consumes them (aligned so each model's neuron is reconstructed)."""

Axis = tuple[Role, str | tuple[str, ...]] | None
"""A tagged axis, or None for an axis no TM acts on (vocabulary, labels, positions). An axis
tagged with several spaces holds them in equal consecutive parts, e.g. GPT-2's fused
`c_attn` output: ("out", ("q.{i}", "k.{i}", "v.{i}"))."""


def axis_spaces(axis: Axis) -> tuple[str, ...]:
    if axis is None:
        return ()
    return (axis[1],) if isinstance(axis[1], str) else axis[1]


def _format(spaces: str | tuple[str, ...], **fmt: int) -> str | tuple[str, ...]:
    if isinstance(spaces, str):
        return spaces.format(**fmt)
    return tuple(s.format(**fmt) for s in spaces)


@dataclass(frozen=True)
class Param:
    name: str
    axes: tuple[Axis, ...]
    optional: bool = False
    # A tied copy of another tensor (an LM head tied to the word embeddings): written as its
    # fused source when the anchor ties them (config `tie_word_embeddings`), fused on its
    # own otherwise.
    tied_to: str | None = None
    # The sizes of its untagged axes, in order: a size role (families/sizes.py: "vocab",
    # "labels", ...) or a number. Tagged axes are as wide as their spaces.
    extents: tuple[str | int, ...] = ()

    def expand(self, **fmt: int) -> Param:
        axes = tuple(None if a is None else (a[0], _format(a[1], **fmt)) for a in self.axes)
        tied = self.tied_to.format(**fmt) if self.tied_to else None
        return Param(self.name.format(**fmt), axes, self.optional, tied, self.extents)


@dataclass(frozen=True)
class Tap:
    """Where activations are read: the input or output of the module owning a tensor, or a
    parameter itself (e.g. ViT position embeddings)."""

    where: Literal["in", "out", "param"]
    name: str  # module path for in/out, full tensor name for param

    def expand(self, **fmt: int) -> Tap:
        return Tap(self.where, self.name.format(**fmt))


@dataclass(frozen=True)
class Layer:
    params: tuple[Param, ...]
    defines: str | tuple[str, ...] | None = None  # several: the parts of a fused output axis
    tap: Tap | None = None  # for several spaces, the tap's features split the same way

    @property
    def spaces(self) -> tuple[str, ...]:
        if self.defines is None:
            return ()
        return (self.defines,) if isinstance(self.defines, str) else self.defines

    def expand(self, **fmt: int) -> Layer:
        return Layer(
            tuple(p.expand(**fmt) for p in self.params),
            _format(self.defines, **fmt) if self.defines else None,
            self.tap.expand(**fmt) if self.tap else None,
        )


@dataclass(frozen=True)
class Merge:
    defines: str
    residual: str
    branch: str
    residual_tap: Tap | None = None
    branch_tap: Tap | None = None

    def expand(self, **fmt: int) -> Merge:
        return Merge(
            self.defines.format(**fmt),
            self.residual.format(**fmt),
            self.branch.format(**fmt),
            self.residual_tap.expand(**fmt) if self.residual_tap else None,
            self.branch_tap.expand(**fmt) if self.branch_tap else None,
        )


@dataclass(frozen=True)
class Attention:
    """The head structure of one attention block, over spaces its layers define.

    `query` holds `heads` heads, `key` and `value` hold `kv_heads` heads (grouped-query
    attention when fewer: query head h reads key/value head h // (heads / kv_heads)).
    `output` is the space the output projection consumes: per query head, the values of its
    group; the engine derives its TM from the value TM and the head matching. With
    `rotary`, query/key dimensions are rotated in frequency pairs, so Q and K heads move
    only as whole heads, with one head map for both and no plan inside a head.
    """

    query: str
    key: str
    value: str
    output: str
    rotary: bool = False

    def expand(self, **fmt: int) -> Attention:
        return Attention(
            self.query.format(**fmt),
            self.key.format(**fmt),
            self.value.format(**fmt),
            self.output.format(**fmt),
            self.rotary,
        )


Node = Layer | Merge | Attention


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    base_prefix: str  # prefix of the backbone's keys inside task models ("bert.")
    architectures: dict[str, tuple[str, ...]]  # class name -> head sections it carries
    embeddings: tuple[Node, ...]
    layer: tuple[Node, ...]
    final: tuple[Node, ...]
    heads: dict[str, tuple[Node, ...]]
    renames: tuple[tuple[str, str], ...] = ()  # regex -> canonical, for other naming schemes
    # Non-parameter tensors, copied from the anchor; `{i}` names repeat per layer.
    buffers: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()  # forward arguments a data file may carry (plus labels)
    token_layout: Literal["text", "vision"] = "text"
    # role -> config.json key: "layers", "heads", and "kv_heads" where the family has
    # grouped-query attention (absent from a config: as many as "heads").
    config_keys: dict[str, str] = field(default_factory=dict)
    tie_default: bool = True  # `tie_word_embeddings` when a config does not say
    # size role -> config.json key, read where present (see sizes.py): with config_keys'
    # heads, what the tensors' shapes follow (compat.expected_shapes)
    size_keys: dict[str, str] = field(default_factory=dict)
    # sizes a family computes from its config and the roles read (GPT-2's null n_inner)
    derive_sizes: Callable[[Mapping[str, Any], dict[str, int]], dict[str, int]] | None = None

    def nodes(self, architecture: str, num_layers: int) -> list[tuple[str, Node]]:
        """The whole flow graph of one architecture, layers unrolled, in forward order, each
        node with the block it belongs to (for progress: "layer 3/12")."""
        nodes = [("embeddings", node) for node in self.embeddings]
        for i in range(num_layers):
            block = f"layer {i + 1}/{num_layers}"
            nodes += [(block, node.expand(i=i, next=i + 1)) for node in self.layer]
        end = [*self.final]
        for section in self.architectures[architecture]:
            end += self.heads[section]
        nodes += [("head", node.expand(i=num_layers, next=num_layers)) for node in end]
        return nodes

    def buffer_names(self, num_layers: int) -> list[str]:
        names = [b for b in self.buffers if "{i}" not in b]
        for i in range(num_layers):
            names += [b.format(i=i) for b in self.buffers if "{i}" in b]
        return names


def linear(
    module: str,
    out: Axis,
    inp: Axis,
    defines: str | None = None,
    tap: bool = True,
    bias: bool | Literal["optional"] = True,
    extent: str | None = None,
) -> Layer:
    """A dense layer: `weight` (out, in) and `bias` (out), tapped at its output. `bias`:
    present, absent, or `"optional"` (a config switch such as Llama's `attention_bias`).
    `extent`: the size role of an untagged output axis (a classifier's "labels")."""
    extents = (extent,) if extent else ()
    params = [Param(f"{module}.weight", (out, inp), extents=extents)]
    if bias:
        optional = bias == "optional"
        params.append(Param(f"{module}.bias", (out,), optional=optional, extents=extents))
    return Layer(tuple(params), defines, Tap("out", module) if tap and defines else None)


def conv1d(module: str, out: Axis, inp: Axis, defines: str | tuple[str, ...] | None) -> Layer:
    """GPT-2's Conv1D: a dense layer whose `weight` is stored (in, out)."""
    params = (Param(f"{module}.weight", (inp, out)), Param(f"{module}.bias", (out,)))
    return Layer(params, defines, Tap("out", module) if defines else None)


def norm(module: str, space: str) -> Layer:
    """LayerNorm: per-neuron scale and shift, aligned by the incoming TM only (sec. 4.2.3)."""
    axes: tuple[Axis, ...] = (("out", space),)
    return Layer((Param(f"{module}.weight", axes), Param(f"{module}.bias", axes)))


def rms_norm(module: str, space: str) -> Layer:
    """RMSNorm: a per-neuron scale only; the root mean square is invariant under
    permutations of the stream, so it follows the incoming TM like LayerNorm."""
    return Layer((Param(f"{module}.weight", (("out", space),)),))
