"""The vocabulary a family description is written in.

A description lists, in forward order, the *nodes* of a transport-map (TM) flow graph over
serialized tensor names (sec. 4.1 of the paper):

- `Layer`: a group of tensors. Each tensor axis is tagged with the space it lives in. If the
  layer `defines` a space, the engine computes that space's TM by OT (from the tensors' rows
  or from the activations at `tap`); otherwise the tensors only follow spaces defined before.
- `Merge`: a residual addition. The merged space's TM combines the residual's and the
  branch's TMs by the residual policy (sec. 4.2.1), optionally weighted by the anchor's
  activations at the two taps.

Names carry `{i}` (layer index) and `{next}` (i + 1) placeholders, expanded per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["out", "in"]
"""`out`: the axis holds values of the space's neurons (aligned by averaging onto the anchor's
neurons); `in`: the axis consumes them (aligned so each model's neuron is reconstructed)."""

Axis = tuple[Role, str] | None
"""A tagged axis, or None for an axis no TM acts on (vocabulary, labels, positions)."""


@dataclass(frozen=True)
class Param:
    name: str
    axes: tuple[Axis, ...]
    optional: bool = False
    tied_to: str | None = None  # stored tied weights (MLM decoder) copy their source

    def expand(self, **fmt: int) -> Param:
        axes = tuple(None if a is None else (a[0], a[1].format(**fmt)) for a in self.axes)
        tied = self.tied_to.format(**fmt) if self.tied_to else None
        return Param(self.name.format(**fmt), axes, self.optional, tied)


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
    defines: str | None = None
    tap: Tap | None = None
    qk: str | None = None  # query and key layers with the same tag may share one TM
    heads: bool = False  # output axis is split into attention heads

    def expand(self, **fmt: int) -> Layer:
        return Layer(
            tuple(p.expand(**fmt) for p in self.params),
            self.defines.format(**fmt) if self.defines else None,
            self.tap.expand(**fmt) if self.tap else None,
            self.qk.format(**fmt) if self.qk else None,
            self.heads,
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


Node = Layer | Merge


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
    buffers: tuple[str, ...] = ()  # non-parameter tensors, copied from the anchor
    inputs: tuple[str, ...] = ()  # forward arguments a data file may carry (plus labels)
    token_layout: Literal["text", "vision"] = "text"
    config_keys: dict[str, str] = field(default_factory=dict)  # role -> config.json key

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


def linear(
    module: str, out: Axis, inp: Axis, defines: str | None = None, tap: bool = True, **kw
) -> Layer:
    """A dense layer: `weight` (out, in) and `bias` (out), tapped at its output."""
    bias_axis = (out,)
    params = (Param(f"{module}.weight", (out, inp)), Param(f"{module}.bias", bias_axis))
    return Layer(params, defines, Tap("out", module) if tap and defines else None, **kw)


def norm(module: str, space: str) -> Layer:
    """LayerNorm: per-neuron scale and shift, aligned by the incoming TM only (sec. 4.2.3)."""
    axes: tuple[Axis, ...] = (("out", space),)
    return Layer((Param(f"{module}.weight", axes), Param(f"{module}.bias", axes)))
