"""The one fusion engine: walks a family's TM flow graph and fuses tensor by tensor.

For every non-anchor model it keeps a plan per space (n_model, n_anchor). At a `Layer` it
maps the tensors' input axes with the plans already known (W T_in), computes the plans of the
spaces the layer defines by OT, aligns the output axes (T_out^T W), and averages with the
anchor. Spaces an `Attention` node names are solved together when the first of them is
reached (one head matching for Q, K and V; see heads.py), and the space the output
projection reads gets its plan from theirs. At a `Merge` it combines two plans by the
residual policy. Tensors are read from disk one layer at a time, in float32 on the job's
device, and each fused tensor is produced once, in the anchor's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass, field

import numpy as np
import torch

from . import solvers
from .cost import block_cost, neuron_rows, pairwise_cost
from .errors import CancelledError, IncompatibleModelsError, InputError
from .families import Attention, Layer, Merge, Node, Param, Tap, axis_spaces
from .heads import HeadSet, head_matched_plans, output_plan
from .models import ParentModel
from .progress import Progress
from .spec import FusionSpec
from .transport import (
    apply_on_axis,
    as_permutation,
    identity_plan,
    in_map,
    merge_plans,
    out_map,
    permutation_distance,
)


@dataclass
class PlanRecord:
    """Diagnostics of one plan: what a user inspects when a layer fuses badly."""

    model: int
    space: str
    shape: tuple[int, int]
    cost: float | None
    distance_from_permutation: float


@dataclass
class EngineResult:
    tensors: dict[str, torch.Tensor]  # canonical name -> fused tensor (CPU, anchor's dtype)
    plans: list[PlanRecord] = field(default_factory=list)
    dtypes: dict[int, list[str]] = field(default_factory=dict)  # model -> stored dtypes read


STREAM_REFINEMENTS = 2  # weights-based shared stream: re-solve it after the inner plans
RMS_SCALE_MAX = 4.0  # a bound for neurons whose sources cancel out

Activations = dict[int, dict[Tap, torch.Tensor]]  # model index -> tap -> (tokens, n)
# The layer being fused and its loaded tensors (model's, anchor's): reused for its features.
Current = tuple[Layer, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None


def check_attention_policy(nodes: list[Node], spec: FusionSpec, anchor: ParentModel) -> None:
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


class Engine:
    def __init__(
        self,
        parents: list[ParentModel],
        anchor: int,
        nodes: list[tuple[str, Node]],
        spec: FusionSpec,
        activations: Activations | None = None,
        progress: Callable[[Progress], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> None:
        self.parents = parents
        self.anchor = parents[anchor]
        self.others = [p for p in parents if p is not self.anchor]
        self.blocks = [block for block, _ in nodes]
        self.nodes = [node for _, node in nodes]
        self.spec = spec
        self.acts = activations or {}
        self.progress = progress or (lambda _p: None)
        self.should_cancel = should_cancel or (lambda: False)
        self.device = torch.device(spec.device)
        weights = spec.model_weights(len(parents))
        self.weight = {p.index: weights[i] for i, p in enumerate(parents)}
        self.plans: dict[int, dict[str, torch.Tensor]] = {p.index: {} for p in self.others}
        self.records: list[PlanRecord] = []
        self.dtypes: dict[int, dict[str, torch.dtype]] = {p.index: {} for p in parents}
        layers = [node for node in self.nodes if isinstance(node, Layer)]
        self.definer = {space: layer for layer in layers for space in layer.spaces}
        self.attention = {
            space: node
            for node in self.nodes
            if isinstance(node, Attention)
            for space in (node.query, node.key, node.value)
        }
        if self.attention:
            self.heads, self.groups = self.anchor.config_value("heads"), self.anchor.kv_heads
            check_attention_policy(self.nodes, spec, self.anchor)
        self._maps: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        # per rectangular plan (by id): the RMS-preserving scale of each anchor neuron
        self._scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        shared = spec.residual == "shared" and spec.method == "ot"  # vanilla: no plans to share
        self.stream = self._stream_spaces() if shared else set()

    # -- the walk ----------------------------------------------------------------------------
    def run(self) -> EngineResult:
        if self.stream and self.spec.method == "ot":
            self._solve_stream()
        return self._walk(emit=True)

    def _walk(self, emit: bool) -> EngineResult:
        """One pass over the graph. Without `emit` it only solves the inner plans (the
        refinement rounds of the shared residual stream)."""
        for plans in self.plans.values():
            for space in [s for s in plans if s not in self.stream]:
                del plans[space]
        self._maps.clear()
        first_record = len(self.records)
        fused: dict[str, torch.Tensor] = {}
        order = list(dict.fromkeys(self.blocks))
        previous = None
        for block, node in zip(self.blocks, self.nodes, strict=True):
            if block != previous:  # a block boundary: the place to stop or report
                if self.should_cancel():
                    raise CancelledError("fusion cancelled")
                self.progress(
                    Progress(order.index(block), len(order), f"aligning {block}", unit="block")
                )
                previous = block
            if isinstance(node, Merge):
                self._merge(node)
            elif isinstance(node, Layer):
                fused.update(self._layer(node, emit))
        if not emit:
            del self.records[first_record:]  # a refinement pass: only the final plans count
            return EngineResult({}, [])
        self.progress(Progress(len(order), len(order), "aligned", unit="block"))
        for node in self.nodes:  # tied copies (LM heads) repeat their fused source
            if isinstance(node, Layer):
                for param in node.params:
                    if self.anchor.is_tied(param) and self.anchor.has(param.name):
                        fused[param.name] = fused[param.tied_to]
        dtypes = {
            index: sorted({str(d).removeprefix("torch.") for d in seen.values()})
            for index, seen in self.dtypes.items()
        }
        return EngineResult(fused, self.records, dtypes)

    def _layer(self, node: Layer, emit: bool = True) -> dict[str, torch.Tensor]:
        spaces = node.spaces
        if not emit and all(space in self.stream for space in spaces):
            return {}
        params = [p for p in node.params if self.anchor.has(p.name) and not self.anchor.is_tied(p)]
        anchor_tensors = {p.name: self._load(self.anchor, p.name) for p in params}
        total = {n: t * self.weight[self.anchor.index] for n, t in anchor_tensors.items()}
        for model in self.others:
            tensors = {p.name: self._load(model, p.name) for p in params}
            # Input axes, and output axes of spaces defined earlier, are mapped first: that
            # is what makes the layer's rows comparable with the anchor's (W T_in).
            for p in params:
                tensors[p.name] = self._align(model, p, tensors[p.name], skip=spaces)
            if spaces:
                current = (node, tensors, anchor_tensors)
                for space in spaces:
                    self._plan(model, space, current)
                for p in params:
                    tensors[p.name] = self._align(model, p, tensors[p.name], only=spaces)
            for name, tensor in tensors.items():
                total[name] = total[name] + tensor * self.weight[model.index]
        dtypes = self.dtypes[self.anchor.index]  # written in the anchor's dtypes
        return {name: t.to("cpu", dtypes[name]) for name, t in total.items()}

    def _merge(self, node: Merge) -> None:
        if node.defines in self.stream:
            return  # one plan for the whole stream, solved up front
        beta = self._residual_beta(node)
        for model in self.others:
            plans = self.plans[model.index]
            plans[node.defines] = merge_plans(plans[node.residual], plans[node.branch], beta)

    # -- pieces --------------------------------------------------------------------------------
    def _load(self, model: ParentModel, name: str) -> torch.Tensor:
        """A tensor in float32 on the job's device, whatever its stored dtype (recorded)."""
        tensor = model.tensor(name)
        self.dtypes[model.index][name] = tensor.dtype
        return tensor.to(self.device, torch.float32)

    def _align(
        self,
        model: ParentModel,
        param: Param,
        tensor: torch.Tensor,
        skip: Container[str] = (),
        only: Container[str] | None = None,
    ) -> torch.Tensor:
        plans = self.plans[model.index]
        for axis, tag in enumerate(param.axes):
            spaces = axis_spaces(tag)
            todo = [s for s in spaces if s not in skip and (only is None or s in only)]
            if not todo:
                continue
            role = tag[0]
            if len(spaces) == 1:
                tensor = self._apply(tensor, axis, plans[spaces[0]], role, spaces[0])
                continue
            parts = _parts(tensor, axis, len(spaces))  # a fused axis: each part its own map
            tensor = torch.cat(
                [
                    self._apply(part, axis, plans[s], role, s) if s in todo else part
                    for s, part in zip(spaces, parts, strict=True)
                ],
                axis,
            )
        return tensor

    def _apply(self, tensor: torch.Tensor, axis: int, plan: torch.Tensor, role: str, space: str):
        mapped = apply_on_axis(tensor, axis, self._map(plan, role))
        if role == "out" and self._temperature_space(space):
            # q.k sums over the model's head_dim d_m and is divided by sqrt(d_m); in the anchor's
            # d_a dims the same logits need q scaled by (d_m / d_a) * sqrt(d_a / d_m)
            mapped = mapped * (plan.shape[0] / plan.shape[1]) ** 0.5
        return mapped

    def _temperature_space(self, space: str) -> bool:
        attention = self.attention.get(space)
        return attention is not None and attention.query == space and self.spec.rectangular == "rms"

    def _map(self, plan: torch.Tensor, role: str) -> torch.Tensor:
        """The normalized map of a plan (or its permutation indices), computed once."""
        key = (id(plan), role)
        if key not in self._maps:
            # Only exact solvers produce permutations; checking a soft plan costs a full pass.
            permutation = as_permutation(plan) if self.spec.solver == "emd" else None
            if permutation is not None:
                mapped = permutation
            else:
                mapped = out_map(plan) if role == "out" else in_map(plan)
                scale = self._rectangular_scale(plan)
                if scale is not None and role == "out":
                    mapped = mapped * scale[None, :]
                elif scale is not None and self.spec.rectangular == "rms":
                    mapped = mapped / scale[None, :]  # consumers undo it
            self._maps[key] = (plan, mapped)  # holding the plan keeps its id unique
        return self._maps[key][1]

    def _rectangular_scale(self, plan: torch.Tensor) -> torch.Tensor | None:
        """The scale of each anchor neuron's aligned output for a rectangular plan under the
        spec's convention (None: mass, or a square plan). `rms`: the neuron's own (see
        `_keep_scale`), and consumers divide by it, so they still reconstruct the model's
        neurons; `width`: the official code's n_model / n_anchor on outputs only."""
        n_model, n_anchor = plan.shape
        convention = self.spec.rectangular
        if n_model == n_anchor or convention == "mass":
            return None
        if convention == "width":
            return torch.full((n_anchor,), n_model / n_anchor, device=plan.device)
        known = self._scales.get(id(plan))
        return known[1] if known is not None else None

    def _keep_scale(self, plan: torch.Tensor, model_rows: list[torch.Tensor]) -> None:
        """RMS preservation: anchor neuron i receives the average sum_j m_ji f_j of the model
        neurons' features f_j (activations, or the defining weights' rows); averaging
        neurons that are not copies of each other shrinks it. Scaled by
        sqrt(sum_j m_ji |f_j|^2) / |sum_j m_ji f_j|, it keeps the mass-weighted RMS of its
        sources; copies of one neuron get exactly 1."""
        if plan.shape[0] == plan.shape[1] or self.spec.rectangular != "rms":
            return
        mass = out_map(plan)
        features = torch.cat([b.float().reshape(b.shape[0], -1) for b in model_rows], 1)
        sources = mass.T @ features.pow(2).sum(1)
        averaged = (mass.T @ features).pow(2).sum(1)
        tiny = torch.finfo(features.dtype).tiny
        scale = (sources.clamp_min(tiny) / averaged.clamp_min(tiny)).sqrt()
        self._scales[id(plan)] = (plan, scale.clamp(max=RMS_SCALE_MAX))

    def _plan(self, model: ParentModel, space: str, current: Current) -> None:
        plans = self.plans[model.index]
        if space in plans:  # the stream's, or solved with its attention block
            return
        if space in self.attention:
            self._solve_attention(model, self.attention[space], current)
        elif self.spec.method == "vanilla":
            plans[space] = self._identity(model, space)
        else:
            model_rows, anchor_rows = self._features(model, space, current)
            cost = block_cost(model_rows, anchor_rows)
            plans[space] = solvers.solve(cost, self.spec.solver, self.spec.reg)
            self._keep_scale(plans[space], model_rows)
            self._record(model, (space,), plans[space], float((plans[space] * cost).sum()))

    def _solve_attention(self, model: ParentModel, attention: Attention, current: Current):
        """Q, K and V of one block together (they share the head matching), then the space
        the output projection reads, derived from the value plan."""
        plans = self.plans[model.index]
        q, k, v = attention.query, attention.key, attention.value
        if self.spec.method == "vanilla":
            for space in (q, k, v):
                plans[space] = self._identity(model, space)
            same = (np.arange(self.heads), np.arange(self.heads))
            plans[attention.output] = output_plan(plans[v], same, self.heads, self.groups)
            return
        rows = {s: self._features(model, s, current) for s in (q, k, v)}
        tied = self.spec.qk == "tied"
        if self.spec.heads == "cross":  # one pool of neurons per space (heads == groups)
            for members in [(q, k), (v,)] if tied else [(q,), (k,), (v,)]:
                cost = block_cost(*([b for s in members for b in rows[s][i]] for i in (0, 1)))
                plan = solvers.solve(cost, self.spec.solver, self.spec.reg)
                self._keep_scale(plan, [b for s in members for b in rows[s][0]])
                for space in members:
                    plans[space] = plan
                self._record(model, members, plan, float((plan * cost).sum()))
            plans[attention.output] = plans[v]
            return

        def head_set(members: tuple[str, ...], **kw) -> HeadSet:
            features = (torch.cat([b for s in members for b in rows[s][i]], 1) for i in (0, 1))
            return HeadSet(members, *features, **kw)

        if attention.rotary:  # whole Q/K heads, one map for both; values aligned inside
            sets = [
                head_set((q,), inside=False),
                head_set((k,), per_group=True, inside=False),
                head_set((v,), per_group=True),
            ]
        elif tied:
            sets = [head_set((q, k)), head_set((v,), per_group=True)]
        else:
            sets = [head_set((q,)), head_set((k,), per_group=True), head_set((v,), per_group=True)]
        result = head_matched_plans(sets, self.heads, self.groups, self.spec.solver, self.spec.reg)
        for head_set_, plan, cost in zip(sets, result.plans, result.costs, strict=True):
            # grouped values: the output projection reads a plan of its own, left unscaled
            if v not in head_set_.spaces or self.groups == self.heads:
                self._keep_scale(plan, [b for s in head_set_.spaces for b in rows[s][0]])
            for space in head_set_.spaces:
                plans[space] = plan
            self._record(model, head_set_.spaces, plan, cost)
        plans[attention.output] = output_plan(plans[v], result.query_pairs, self.heads, self.groups)

    def _record(self, model: ParentModel, spaces, plan: torch.Tensor, cost: float) -> None:
        self.records.append(
            PlanRecord(
                model.index, "+".join(spaces), tuple(plan.shape), cost, permutation_distance(plan)
            )
        )

    def _identity(self, model: ParentModel, space: str) -> torch.Tensor:
        n_model, n_anchor = self._width(model, space), self._width(self.anchor, space)
        if n_model != n_anchor:
            raise IncompatibleModelsError(
                f"{model.label}: vanilla fusion needs equal widths, space {space} "
                f"has {n_model} vs {n_anchor} in the anchor"
            )
        return identity_plan(n_anchor, self.device)

    def _features(self, model: ParentModel, space: str, current: Current):
        """Row blocks (n, F_block) describing each neuron of `space`, in the model and in the
        anchor: activations at the defining layer's tap, or its tensors' rows."""
        layer = self.definer[space]
        if self.spec.alignment == "activations" and layer.tap is not None:
            # (tokens, n) -> one row of activations per neuron
            acts = (self.acts[model.index][layer.tap], self.acts[self.anchor.index][layer.tap])
            return tuple([_part_of(a, 1, layer.spaces, space).T] for a in acts)
        if current is not None and current[0] is layer:
            tensors, anchor_tensors = current[1], current[2]
        else:  # a layer solved with this one (its attention block's other projections)
            params = [
                p for p in layer.params if self.anchor.has(p.name) and not self.anchor.is_tied(p)
            ]
            tensors = {
                p.name: self._align(model, p, self._load(model, p.name), skip=layer.spaces)
                for p in params
            }
            anchor_tensors = {p.name: self._load(self.anchor, p.name) for p in params}
        model_rows, anchor_rows = [], []
        for p in layer.params:
            for axis, tag in enumerate(p.axes):
                spaces = axis_spaces(tag)
                if p.name in tensors and space in spaces and tag[0] == "out":
                    for rows, t in ((model_rows, tensors), (anchor_rows, anchor_tensors)):
                        rows += neuron_rows([_part_of(t[p.name], axis, spaces, space)], [axis])
        return model_rows, anchor_rows

    def _width(self, model: ParentModel, space: str) -> int:
        for p in self.definer[space].params:
            for axis, tag in enumerate(p.axes):
                if tag is not None and tag[0] == "out" and space in axis_spaces(tag):
                    size = model.checkpoint.shape(model.keys[p.name])[axis]
                    return size // len(axis_spaces(tag))
        raise ValueError(f"space {space} has no output axis")

    # -- the shared residual stream ---------------------------------------------------------
    def _stream_spaces(self) -> set[str]:
        """Spaces joined by residual additions: with the `shared` policy they are one space,
        so every layer writing into the stream is aligned with the same plan, and for hard
        plans the aligned model computes exactly what it computed before."""
        stream: set[str] = set()
        for node in self.nodes:
            if isinstance(node, Merge):
                stream |= {node.defines, node.residual, node.branch}
        return stream

    def _solve_stream(self) -> None:
        rounds = 1 if self.spec.alignment == "activations" else 1 + STREAM_REFINEMENTS
        for number in range(rounds):
            for model in self.others:
                if self.spec.alignment == "activations":
                    m_feat, a_feat = self._stream_activations(model)
                else:
                    m_feat, a_feat = self._stream_weights(model, first=number == 0)
                cost = pairwise_cost(m_feat, a_feat)
                plan = solvers.solve(cost, self.spec.solver, self.spec.reg)
                self._keep_scale(plan, [m_feat])
                for space in self.stream:
                    self.plans[model.index][space] = plan
                if number == rounds - 1:
                    self.records.append(
                        PlanRecord(
                            model.index,
                            "stream",
                            tuple(plan.shape),
                            float((plan * cost).sum()),
                            permutation_distance(plan),
                        )
                    )
            if number < rounds - 1:
                self._walk(emit=False)  # inner plans under this stream plan

    def _stream_weights(self, model: ParentModel, first: bool):
        """Each stream neuron's weights across every tensor touching the stream, other axes
        mapped by the current inner plans; each tensor weighs the same."""
        model_blocks, anchor_blocks = [], []
        for node in self.nodes:
            if not isinstance(node, Layer):
                continue
            for p in node.params:
                if self.anchor.is_tied(p) or not self.anchor.has(p.name):
                    continue
                streams = [bool(set(axis_spaces(tag)) & self.stream) for tag in p.axes]
                axes = [k for k, in_stream in enumerate(streams) if in_stream]
                inner = [tag for tag, s in zip(p.axes, streams, strict=True) if tag and not s]
                if len(axes) != 1 or (first and inner):
                    continue
                m = self._align(model, p, self._load(model, p.name), skip=self.stream)
                a = self._load(self.anchor, p.name)
                for block, t in ((model_blocks, m), (anchor_blocks, a)):
                    rows = t.movedim(axes[0], 0).reshape(t.shape[axes[0]], -1)
                    block.append(rows / rows.norm().clamp_min(1e-12))
        return torch.cat(model_blocks, 1), torch.cat(anchor_blocks, 1)

    def _stream_activations(self, model: ParentModel):
        """The stream's activations at every residual addition, each tap at unit scale."""
        taps = dict.fromkeys(
            t
            for n in self.nodes
            if isinstance(n, Merge)
            for t in (n.residual_tap, n.branch_tap)
            if t is not None
        )
        features = []
        for index in (model.index, self.anchor.index):
            rows = [self.acts[index][t] for t in taps]
            features.append(
                torch.cat([r / r.pow(2).mean().sqrt().clamp_min(1e-12) for r in rows]).T
            )
        return features[0], features[1]

    def _residual_beta(self, node: Merge) -> torch.Tensor | float:
        policy = self.spec.residual
        if policy == "average" or self.spec.method == "vanilla":
            return 0.5
        if policy == "identity":
            return 1.0  # the skip path is an identity: keep the residual stream's TM
        acts = self.acts[self.anchor.index]
        residual = acts[node.residual_tap].abs()
        branch = acts[node.branch_tap].abs()
        if policy == "weighted-scalar":
            r = residual.pow(2).sum(1).sqrt().mean()
            b = branch.pow(2).sum(1).sqrt().mean()
            return float(r / (r + b).clamp_min(1e-12))
        r, b = residual.mean(0), branch.mean(0)  # weighted-matrix: one weight per neuron
        return r / (r + b).clamp_min(1e-12)


def _parts(tensor: torch.Tensor, axis: int, count: int) -> tuple[torch.Tensor, ...]:
    """The equal consecutive parts of a fused axis (GPT-2's Q, K, V)."""
    if tensor.shape[axis] % count:
        raise InputError(f"a fused axis of size {tensor.shape[axis]} is not {count} equal parts")
    return tensor.chunk(count, axis)


def _part_of(tensor: torch.Tensor, axis: int, spaces: tuple[str, ...], space: str):
    return tensor if len(spaces) == 1 else _parts(tensor, axis, len(spaces))[spaces.index(space)]
