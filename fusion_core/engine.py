"""The one fusion engine: walks a family's TM flow graph and fuses tensor by tensor.

For every non-anchor model it keeps a plan per space (n_model, n_anchor). At a `Layer` it
maps the tensors' input axes with the plans already known (W T_in), computes the layer's own
plan by OT when the layer defines a space, aligns the output axes (T_out^T W), and averages
with the anchor. At a `Merge` it combines two plans by the residual policy. Tensors are read
from disk one layer at a time and each fused tensor is produced once.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass, field

import torch

from . import solvers
from .cost import block_cost, neuron_rows, pairwise_cost
from .errors import CancelledError, IncompatibleModelsError
from .families import Layer, Merge, Node, Param, Tap
from .heads import head_matched_plans
from .models import ParentModel
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
class Progress:
    step: int
    total: int
    detail: str


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
    tensors: dict[str, torch.Tensor]  # canonical name -> fused tensor (CPU)
    plans: list[PlanRecord] = field(default_factory=list)


STREAM_REFINEMENTS = 2  # weights-based shared stream: re-solve it after the inner plans

Activations = dict[int, dict[Tap, torch.Tensor]]  # model index -> tap -> (tokens, n)


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
        self.groups = self._solve_groups()
        self._maps: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        shared = spec.residual == "shared" and spec.method == "ot"  # vanilla: no plans to share
        self.stream = self._stream_spaces() if shared else set()

    def _solve_groups(self) -> dict[str, list[list[Layer]]]:
        """Layers whose plans are solved together, as sets of layers sharing one plan: tied
        query/key share a plan; with matched heads, a block's Q, K and V share the head
        matching. Keyed by every member's space."""
        groups: dict[str, list[list[Layer]]] = {}
        by_block: dict[str, list[Layer]] = {}
        for block, node in zip(self.blocks, self.nodes, strict=True):
            if isinstance(node, Layer) and node.defines and (node.heads or node.qk):
                by_block.setdefault(block, []).append(node)
        for layers in by_block.values():
            sets: dict[str, list[Layer]] = {}
            for layer in layers:
                key = layer.qk if layer.qk and self.spec.qk == "tied" else layer.defines
                sets.setdefault(key, []).append(layer)
            if self.spec.heads == "matched":
                for layer in layers:
                    groups[layer.defines] = list(sets.values())
            else:
                for members in sets.values():
                    for layer in members:
                        groups[layer.defines] = [members]
        return groups

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
                self.progress(Progress(order.index(block), len(order), f"aligning {block}"))
                previous = block
            if isinstance(node, Merge):
                self._merge(node)
            else:
                fused.update(self._layer(node, emit))
        if not emit:
            del self.records[first_record:]  # a refinement pass: only the final plans count
            return EngineResult({}, [])
        self.progress(Progress(len(order), len(order), "aligned"))
        for node in self.nodes:  # tied copies (MLM decoder) repeat their fused source
            if isinstance(node, Layer):
                for param in node.params:
                    if param.tied_to and self.anchor.has(param.name):
                        fused[param.name] = fused[param.tied_to]
        return EngineResult(fused, self.records)

    def _layer(self, node: Layer, emit: bool = True) -> dict[str, torch.Tensor]:
        if not emit and not (node.defines and node.defines not in self.stream):
            return {}
        params = [p for p in node.params if self.anchor.has(p.name) and not p.tied_to]
        anchor_tensors = {p.name: self._load(self.anchor, p.name) for p in params}
        total = {n: t * self.weight[self.anchor.index] for n, t in anchor_tensors.items()}
        for model in self.others:
            tensors = {p.name: self._load(model, p.name) for p in params}
            # Input axes, and output axes of spaces defined earlier, are mapped first: that
            # is what makes the layer's rows comparable with the anchor's (W T_in).
            for p in params:
                tensors[p.name] = self._align(model, p, tensors[p.name], skip=(node.defines,))
            if node.defines:
                plan = self._plan(model, node, params, tensors, anchor_tensors)
                self.plans[model.index][node.defines] = plan
                for p in params:
                    tensors[p.name] = self._align(model, p, tensors[p.name], only=(node.defines,))
            for name, tensor in tensors.items():
                total[name] = total[name] + tensor * self.weight[model.index]
        return {name: t.to("cpu", anchor_tensors[name].dtype) for name, t in total.items()}

    def _merge(self, node: Merge) -> None:
        if node.defines in self.stream:
            return  # one plan for the whole stream, solved up front
        beta = self._residual_beta(node)
        for model in self.others:
            plans = self.plans[model.index]
            plans[node.defines] = merge_plans(plans[node.residual], plans[node.branch], beta)

    # -- pieces --------------------------------------------------------------------------------
    def _load(self, model: ParentModel, name: str) -> torch.Tensor:
        return model.tensor(name).to(self.device, torch.float32)

    def _align(
        self,
        model: ParentModel,
        param: Param,
        tensor: torch.Tensor,
        skip: Container[str] = (),
        only: Container[str] | None = None,
    ) -> torch.Tensor:
        for axis, tag in enumerate(param.axes):
            if tag is None:
                continue
            role, space = tag
            if space in skip or (only is not None and space not in only):
                continue
            tensor = apply_on_axis(tensor, axis, self._map(self.plans[model.index][space], role))
        return tensor

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
            self._maps[key] = (plan, mapped)  # holding the plan keeps its id unique
        return self._maps[key][1]

    def _plan(
        self,
        model: ParentModel,
        node: Layer,
        params: list[Param],
        tensors: dict[str, torch.Tensor],
        anchor_tensors: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        known = self.plans[model.index].get(node.defines)  # the stream's, or solved in a group
        if known is not None:  # solved together with an earlier layer of its group
            return known
        if self.spec.method == "vanilla":
            n_model = self._width(model, node, params)
            n_anchor = self._width(self.anchor, node, params)
            if n_model != n_anchor:
                raise IncompatibleModelsError(
                    f"{model.label}: vanilla fusion needs equal widths, space {node.defines} "
                    f"has {n_model} vs {n_anchor} in the anchor"
                )
            return identity_plan(n_anchor, self.device)
        group = self.groups.get(node.defines, [[node]])
        feature_sets = []
        for members in group:
            model_rows, anchor_rows = [], []
            for member in members:
                if member is node:
                    m_feat, a_feat = self._features(model, member, params, tensors, anchor_tensors)
                else:  # a layer solved with this one (tied key, or its attention's heads)
                    m_params = [p for p in member.params if self.anchor.has(p.name)]
                    m_tensors = {
                        p.name: self._align(
                            model, p, self._load(model, p.name), skip=(member.defines,)
                        )
                        for p in m_params
                    }
                    a_tensors = {p.name: self._load(self.anchor, p.name) for p in m_params}
                    m_feat, a_feat = self._features(model, member, m_params, m_tensors, a_tensors)
                model_rows += m_feat
                anchor_rows += a_feat
            feature_sets.append((model_rows, anchor_rows))

        if node.heads and self.spec.heads == "matched":
            plans, costs = head_matched_plans(
                [(torch.cat(m, 1), torch.cat(a, 1)) for m, a in feature_sets],
                self.anchor.config_value("heads"),
                self.spec.solver,
                self.spec.reg,
            )
        else:
            plans, costs = [], []
            for model_blocks, anchor_blocks in feature_sets:
                cost = block_cost(model_blocks, anchor_blocks)
                plans.append(solvers.solve(cost, self.spec.solver, self.spec.reg))
                costs.append(float((plans[-1] * cost).sum()))
        for members, plan, cost in zip(group, plans, costs, strict=True):
            for member in members:
                self.plans[model.index][member.defines] = plan
            self.records.append(
                PlanRecord(
                    model.index,
                    "+".join(m.defines for m in members),
                    tuple(plan.shape),
                    cost,
                    permutation_distance(plan),
                )
            )
        return self.plans[model.index][node.defines]

    def _features(self, model, node, params, tensors, anchor_tensors):
        """Row blocks (n, F_block) describing each neuron of the layer's output space."""
        if self.spec.alignment == "activations" and node.tap is not None:
            # (tokens, n) -> one row of activations per neuron
            return [self.acts[model.index][node.tap].T], [self.acts[self.anchor.index][node.tap].T]
        out_params = [p for p in params if ("out", node.defines) in p.axes]
        axes = [p.axes.index(("out", node.defines)) for p in out_params]
        return (
            neuron_rows([tensors[p.name] for p in out_params], axes),
            neuron_rows([anchor_tensors[p.name] for p in out_params], axes),
        )

    def _width(self, model: ParentModel, node: Layer, params: list[Param]) -> int:
        for p in params:
            if ("out", node.defines) in p.axes:
                return model.checkpoint.shape(model.keys[p.name])[
                    p.axes.index(("out", node.defines))
                ]
        raise ValueError(f"layer defining {node.defines} has no output axis")

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
                if p.tied_to or not self.anchor.has(p.name):
                    continue
                axes = [k for k, tag in enumerate(p.axes) if tag and tag[1] in self.stream]
                inner = [tag for tag in p.axes if tag and tag[1] not in self.stream]
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
