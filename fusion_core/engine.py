"""The one fusion engine: walks a family's TM flow graph and fuses tensor by tensor.

For every non-anchor model it keeps a plan per space (n_model, n_anchor). At a `Layer` it
maps the tensors' input axes with the plans already known (W T_in), computes the layer's own
plan by OT when the layer defines a space, aligns the output axes (T_out^T W), and averages
with the anchor. At a `Merge` it combines two plans by the residual policy. Tensors are read
from disk one layer at a time and each fused tensor is produced once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from . import solvers
from .cost import neuron_features, pairwise_cost
from .errors import CancelledError, IncompatibleModelsError
from .families import Layer, Merge, Node, Param, Tap
from .models import ParentModel
from .spec import FusionSpec
from .transport import (
    apply_on_axis,
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
        self.qk_partner = self._qk_groups() if spec.qk == "tied" else {}

    def _qk_groups(self) -> dict[str, list[Layer]]:
        groups: dict[str, list[Layer]] = {}
        for node in self.nodes:
            if isinstance(node, Layer) and node.qk:
                groups.setdefault(node.qk, []).append(node)
        return groups

    # -- the walk ----------------------------------------------------------------------------
    def run(self) -> EngineResult:
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
                fused.update(self._layer(node))
        self.progress(Progress(len(order), len(order), "aligned"))
        for node in self.nodes:  # tied copies (MLM decoder) repeat their fused source
            if isinstance(node, Layer):
                for param in node.params:
                    if param.tied_to and self.anchor.has(param.name):
                        fused[param.name] = fused[param.tied_to]
        return EngineResult(fused, self.records)

    def _layer(self, node: Layer) -> dict[str, torch.Tensor]:
        params = [p for p in node.params if self.anchor.has(p.name) and not p.tied_to]
        anchor_tensors = {p.name: self._load(self.anchor, p.name) for p in params}
        total = {n: t * self.weight[self.anchor.index] for n, t in anchor_tensors.items()}
        for model in self.others:
            tensors = {p.name: self._load(model, p.name) for p in params}
            # Input axes, and output axes of spaces defined earlier, are mapped first: that
            # is what makes the layer's rows comparable with the anchor's (W T_in).
            for p in params:
                tensors[p.name] = self._align(model, p, tensors[p.name], skip=node.defines)
            if node.defines:
                plan = self._plan(model, node, params, tensors, anchor_tensors)
                self.plans[model.index][node.defines] = plan
                for p in params:
                    tensors[p.name] = self._align(model, p, tensors[p.name], only=node.defines)
            for name, tensor in tensors.items():
                total[name] = total[name] + tensor * self.weight[model.index]
        return {name: t.to("cpu", anchor_tensors[name].dtype) for name, t in total.items()}

    def _merge(self, node: Merge) -> None:
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
        skip: str | None = None,
        only: str | None = None,
    ) -> torch.Tensor:
        for axis, tag in enumerate(param.axes):
            if tag is None:
                continue
            role, space = tag
            if (skip is not None and space == skip) or (only is not None and space != only):
                continue
            plan = self.plans[model.index][space]
            tensor = apply_on_axis(tensor, axis, out_map(plan) if role == "out" else in_map(plan))
        return tensor

    def _plan(
        self,
        model: ParentModel,
        node: Layer,
        params: list[Param],
        tensors: dict[str, torch.Tensor],
        anchor_tensors: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        group = self.qk_partner.get(node.qk, [node]) if node.qk else [node]
        if len(group) > 1 and node is not group[0]:
            return self.plans[model.index][group[0].defines]  # tied: the query's plan
        n_model = self._width(model, node, params)
        n_anchor = self._width(self.anchor, node, params)
        if self.spec.method == "vanilla":
            if n_model != n_anchor:
                raise IncompatibleModelsError(
                    f"{model.label}: vanilla fusion needs equal widths, space {node.defines} "
                    f"has {n_model} vs {n_anchor} in the anchor"
                )
            return identity_plan(n_anchor, self.device)
        model_rows, anchor_rows = [], []
        for member in group:
            if member is node:
                m_feat, a_feat = self._features(model, member, params, tensors, anchor_tensors)
            else:  # the key layer of a tied pair, read here to share the query's plan
                m_params = [p for p in member.params if self.anchor.has(p.name)]
                m_tensors = {
                    p.name: self._align(model, p, self._load(model, p.name), skip=member.defines)
                    for p in m_params
                }
                a_tensors = {p.name: self._load(self.anchor, p.name) for p in m_params}
                m_feat, a_feat = self._features(model, member, m_params, m_tensors, a_tensors)
            model_rows.append(m_feat)
            anchor_rows.append(a_feat)
        cost = pairwise_cost(torch.cat(model_rows, 1), torch.cat(anchor_rows, 1))
        plan = solvers.solve(cost, self.spec.solver, self.spec.reg)
        self.records.append(
            PlanRecord(
                model.index,
                node.defines or "",
                tuple(plan.shape),
                float((plan * cost).sum()),
                permutation_distance(plan),
            )
        )
        for member in group[1:]:
            self.plans[model.index][member.defines] = plan
        return plan

    def _features(self, model, node, params, tensors, anchor_tensors):
        if self.spec.alignment == "activations" and node.tap is not None:
            # (tokens, n) -> one row of activations per neuron
            return self.acts[model.index][node.tap].T, self.acts[self.anchor.index][node.tap].T
        out_params = [p for p in params if ("out", node.defines) in p.axes]
        axes = [p.axes.index(("out", node.defines)) for p in out_params]
        return (
            neuron_features([tensors[p.name] for p in out_params], axes),
            neuron_features([anchor_tensors[p.name] for p in out_params], axes),
        )

    def _width(self, model: ParentModel, node: Layer, params: list[Param]) -> int:
        for p in params:
            if ("out", node.defines) in p.axes:
                return model.checkpoint.shape(model.keys[p.name])[
                    p.axes.index(("out", node.defines))
                ]
        raise ValueError(f"layer defining {node.defines} has no output axis")

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


def iter_plans(result: EngineResult) -> Iterator[PlanRecord]:
    yield from result.plans
