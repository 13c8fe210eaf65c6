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
from .compat import STREAM_REFINEMENTS, check_attention_policy
from .cost import GramCost, block_cost, neuron_rows
from .errors import CancelledError, IncompatibleModelsError, InputError
from .families import Attention, Layer, Merge, Node, Param, Tap, axis_spaces
from .heads import HeadSet, head_matched_plans, output_plan
from .models import ParentModel
from .progress import Progress
from .spec import FusionSpec
from .transport import (
    GatheredMap,
    HeadBlockMap,
    ScaledPlan,
    SparseMap,
    apply_on_axis,
    as_permutation,
    in_scaled,
    merge_plans,
    out_map,
    out_scaled,
    permutation_distance,
)

__all__ = ["Engine", "EngineResult", "PlanRecord", "check_attention_policy"]


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
    # canonical name -> fused tensor (CPU, anchor's dtype); empty when a sink took them
    tensors: dict[str, torch.Tensor]
    plans: list[PlanRecord] = field(default_factory=list)
    dtypes: dict[int, list[str]] = field(default_factory=dict)  # model -> stored dtypes read
    # with keep_plans: "model<i>/<record space>" -> the plan (CPU, float32)
    kept_plans: dict[str, torch.Tensor] = field(default_factory=dict)


# how a plan is applied (transport.apply_on_axis)
Map = torch.Tensor | ScaledPlan | GatheredMap | HeadBlockMap | SparseMap

# Receives each fused tensor, or a block of its rows starting at the given row, under its
# canonical name (a tied copy is sent again under its own name).
Sink = Callable[[str, torch.Tensor, int], None]

BLOCK_BYTES = 32 << 20  # float32 bytes per block of rows read where rows are not transported
RMS_SCALE_MAX = 4.0  # a bound for neurons whose sources cancel out

Activations = dict[int, dict[Tap, torch.Tensor]]  # model index -> tap -> (tokens, n)
# The layer being fused and its loaded tensors (model's, anchor's): reused for its features.
Current = tuple[Layer, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None


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
        keep_plans: bool = False,
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
        self._maps: dict[tuple[int, str], tuple[torch.Tensor, Map]] = {}
        # per rectangular plan (by id): the RMS-preserving scale of each anchor neuron
        self._scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        shared = spec.residual == "shared" and spec.method == "ot"  # vanilla: no plans to share
        self.stream = self._stream_spaces() if shared else set()
        # maps between different widths keep their neurons' RMS (see _keep_scale): streamed
        # costs then also accumulate the model neurons' own Gram matrix
        self.rms_rectangular = spec.rectangular == "rms" and any(
            model.checkpoint.shape(model.keys[p.name])
            != self.anchor.checkpoint.shape(self.anchor.keys[p.name])
            for model in self.others
            for layer in layers
            for p in layer.params
            if self.anchor.has(p.name) and model.has(p.name)
        )
        self.keep_plans = keep_plans
        self.kept: dict[str, torch.Tensor] = {}
        self._kept_by_plan: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # tied copies the anchor stores: written again from their source's fused rows
        self.copies: dict[str, list[str]] = {}
        for layer in layers:
            for param in layer.params:
                if self.anchor.is_tied(param) and self.anchor.has(param.name):
                    self.copies.setdefault(param.tied_to, []).append(param.name)
        # the last node reading each space: its plans are freed after it
        self.last_use: dict[int, list[str]] = {}
        seen: dict[str, int] = {}
        for k, node in enumerate(self.nodes):
            if isinstance(node, Layer):
                named = [s for p in node.params for tag in p.axes for s in axis_spaces(tag)]
            elif isinstance(node, Merge):
                named = [node.defines, node.residual, node.branch]
            else:
                named = [node.query, node.key, node.value, node.output]
            seen.update(dict.fromkeys(named, k))
        for space, k in seen.items():
            self.last_use.setdefault(k, []).append(space)
        self.sink: Sink | None = None
        self.bytes_written = 0
        self.total_bytes = sum(self._nbytes(name) for name in self.output_names())

    # -- what is written ---------------------------------------------------------------------
    def output_names(self) -> list[str]:
        """Every fused tensor's canonical name (tied copies the anchor stores included), in
        the order they are produced."""
        names = []
        for node in self.nodes:
            if isinstance(node, Layer):
                names += [p.name for p in node.params if self.anchor.has(p.name)]
        return names

    def _nbytes(self, name: str) -> int:
        key = self.anchor.keys[name]
        shape, dtype = self.anchor.checkpoint.shape(key), self._out_dtype(name)
        return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    def _out_dtype(self, name: str) -> torch.dtype:
        return self.anchor.checkpoint.dtype(self.anchor.keys[name])

    def _emit(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        """A fused tensor (or rows row.. of it), in the anchor's dtype, to the sink."""
        tensor = tensor.to("cpu", self._out_dtype(name))
        for target in (name, *self.copies.get(name, ())):
            self.sink(target, tensor, row)
            self.bytes_written += tensor.numel() * tensor.element_size()

    # -- the walk ----------------------------------------------------------------------------
    def run(self, sink: Sink | None = None) -> EngineResult:
        """Fuse, handing every fused tensor to `sink` as soon as it is produced; without a
        sink the tensors are collected in the result (small models, tests)."""
        collected: dict[str, torch.Tensor] = {}
        if sink is None:
            sink = _collector(self.anchor, collected)
        self.sink = sink
        if self.spec.method == "vanilla":
            self._average()
        else:
            if self.stream:
                self._solve_stream()
            self._walk(emit=True)
        dtypes = {
            index: sorted({str(d).removeprefix("torch.") for d in seen.values()})
            for index, seen in self.dtypes.items()
        }
        return EngineResult(collected, self.records, dtypes, self._kept())

    def _blocks(self, order: list[str], block: str, previous: str | None, emit: bool) -> str:
        """At a block boundary: the place to stop or report."""
        if block != previous:
            if self.should_cancel():
                raise CancelledError("fusion cancelled")
            self._report(order.index(block), len(order), f"aligning {block}", emit)
        return block

    def _report(self, step: int, total: int, detail: str, emit: bool = True) -> None:
        written = self.bytes_written if emit else None
        if written is not None and self.total_bytes:
            detail += f" ({written / 2**20:,.0f}/{self.total_bytes / 2**20:,.0f} MiB written)"
        self.progress(
            Progress(
                step,
                total,
                detail,
                unit="block",
                bytes_written=written,
                bytes_total=self.total_bytes if emit else None,
            )
        )

    def _walk(self, emit: bool, stream_costs: dict[int, GramCost] | None = None) -> None:
        """One pass over the graph. Without `emit` it only solves the inner plans (the
        refinement rounds of the shared residual stream), accumulating `stream_costs`."""
        for plans in self.plans.values():
            for space in [s for s in plans if s not in self.stream]:
                del plans[space]
        self._maps.clear()
        live = {id(p) for plans in self.plans.values() for p in plans.values()}
        self._scales = {key: value for key, value in self._scales.items() if key in live}
        first_record = len(self.records)
        order = list(dict.fromkeys(self.blocks))
        previous = None
        for k, (block, node) in enumerate(zip(self.blocks, self.nodes, strict=True)):
            previous = self._blocks(order, block, previous, emit)
            if isinstance(node, Merge):
                self._merge(node)
            elif isinstance(node, Layer):
                self._layer(node, emit)
            if stream_costs is not None:
                for model in self.others:
                    for param, axis in self._stream_params(node, first=False):
                        part = self._stream_part(model, param, axis)
                        stream_costs[model.index].add_scaled(part)
            self._free(k)
        if not emit:
            del self.records[first_record:]  # a refinement pass: only the final plans count
            return
        self._report(len(order), len(order), "aligned")

    def _free(self, k: int) -> None:
        """Drop the plans (and their maps) of spaces no node after node k reads."""
        done = [s for s in self.last_use.get(k, ()) if s not in self.stream]
        if not done:
            return
        for plans in self.plans.values():
            for space in done:
                plans.pop(space, None)
        live = {id(p) for plans in self.plans.values() for p in plans.values()}
        self._maps = {key: value for key, value in self._maps.items() if key[0] in live}
        self._scales = {key: value for key, value in self._scales.items() if key in live}

    def _average(self) -> None:
        """Vanilla fusion: the weighted average of every tensor, block of rows by block of
        rows; no plans, no products. Widths must be equal (checked before anything is
        written)."""
        names = [n for n in self.output_names() if n not in self._copy_names()]
        for model in self.others:
            for name in names:
                shape = model.checkpoint.shape(model.keys[name])
                anchor_shape = self.anchor.checkpoint.shape(self.anchor.keys[name])
                if shape != anchor_shape:
                    raise IncompatibleModelsError(
                        f"{model.label}: vanilla fusion needs equal widths, tensor {name!r} "
                        f"has shape {tuple(shape)} vs {tuple(anchor_shape)} in the anchor"
                    )
        order = list(dict.fromkeys(self.blocks))
        previous = None
        for block, node in zip(self.blocks, self.nodes, strict=True):
            previous = self._blocks(order, block, previous, True)
            if not isinstance(node, Layer):
                continue
            for param in node.params:
                if param.name not in names:
                    continue
                for start, stop in self._row_blocks(param.name):
                    total = self._mean_rows(param.name, start, stop)
                    self._emit(param.name, total, start)
        self._report(len(order), len(order), "averaged")

    def _mean_rows(self, name: str, start: int, stop: int | None) -> torch.Tensor:
        """The weighted mean of rows start:stop of `name` over the parents, in float32, each
        parent's rows added in one pass as stored. A non-finite value in any parent makes the
        mean non-finite (inf - inf and inf * 0 are NaN), so one check of the mean stands for
        a check of each parent; only then is the culprit looked for."""
        reads = []
        for model in (self.anchor, *self.others):
            rows = model.checkpoint.rows(model.keys[name], start, stop, check=False)
            self.dtypes[model.index][name] = rows.dtype
            reads.append((model, rows))
        total = reads[0][1].to(self.device, torch.float32).mul_(self.weight[self.anchor.index])
        for model, rows in reads[1:]:
            total.add_(rows.to(self.device), alpha=self.weight[model.index])
        if not bool(torch.isfinite(total.sum())) and not bool(torch.isfinite(total).all()):
            for model, _ in reads:  # read again: the anchor's rows may be the mean now
                model.checkpoint.rows(model.keys[name], start, stop)
        return total

    def _copy_names(self) -> set[str]:
        return {c for copies in self.copies.values() for c in copies}

    def _row_blocks(self, name: str) -> list[tuple[int, int | None]]:
        """Row ranges of the anchor's tensor `name`, each about BLOCK_BYTES in float32."""
        shape = self.anchor.checkpoint.shape(self.anchor.keys[name])
        if not shape:
            return [(0, None)]
        row = max(int(np.prod(shape[1:], dtype=np.int64)) * 4, 1)
        step = max(BLOCK_BYTES // row, 1)
        return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]

    def _blocked(self, params: list[Param]) -> bool:
        """Whether a layer is fused in blocks of rows: no plan acts on its rows, and it is
        large (vocabulary tables, LM heads)."""
        if not params or any(p.axes[0] is not None for p in params):
            return False
        return sum(self._nbytes(p.name) for p in params) > 2 * BLOCK_BYTES

    def _layer(self, node: Layer, emit: bool = True) -> None:
        spaces = node.spaces
        if not emit and all(space in self.stream for space in spaces):
            return
        params = [p for p in node.params if self.anchor.has(p.name) and not self.anchor.is_tied(p)]
        if self._blocked(params):
            self._layer_in_blocks(node, params, emit)
            return
        anchor_tensors = {p.name: self._load(self.anchor, p.name) for p in params}
        weight = self.weight[self.anchor.index]
        total = {n: t * weight for n, t in anchor_tensors.items()} if emit else {}
        # (the anchor's tensors stay as read: they are the features of this layer's costs)
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
                if not emit:
                    # A refinement pass only needs the plans: the stream's cost maps the
                    # tensors it reads itself (`_stream_part`), so the new plans' products
                    # (at 1B, 550 GFLOP for an MLP's gate and up) would be thrown away.
                    continue
                for p in params:
                    tensors[p.name] = self._align(model, p, tensors[p.name], only=spaces)
            for name, tensor in tensors.items():
                total[name].add_(tensor, alpha=self.weight[model.index])
            del tensors
        if emit:
            for name, tensor in total.items():
                self._emit(name, tensor)

    def _layer_in_blocks(self, node: Layer, params: list[Param], emit: bool) -> None:
        """A layer whose rows no plan acts on, in blocks of rows: the plans it defines from
        costs accumulated block by block, then each block aligned, averaged and emitted."""
        for model in self.others:
            for space in node.spaces:
                if space not in self.plans[model.index]:
                    self._plan(model, space, None)
        if not emit:
            return
        for param in params:
            for start, stop in self._row_blocks(param.name):
                total = self._load(self.anchor, param.name, start, stop)
                total *= self.weight[self.anchor.index]
                for model in self.others:
                    rows = self._align(model, param, self._load(model, param.name, start, stop))
                    total += rows * self.weight[model.index]
                self._emit(param.name, total, start)

    def _blocked_cost(
        self, model: ParentModel, layer: Layer, space: str, accumulated: GramCost
    ) -> torch.Tensor:
        """The weights-based cost of `space` from its defining layer's tensors, read and
        accumulated in blocks of rows (a layer whose rows no plan acts on)."""
        for p in layer.params:
            if not self.anchor.has(p.name) or self.anchor.is_tied(p):
                continue
            axes = [
                (axis, axis_spaces(tag))
                for axis, tag in enumerate(p.axes)
                if tag is not None and tag[0] == "out" and space in axis_spaces(tag)
            ]
            if not axes:
                continue
            for start, stop in self._row_blocks(p.name):
                rows = self._load(model, p.name, start, stop)
                rows = self._align(model, p, rows, skip=layer.spaces)
                anchor_rows = self._load(self.anchor, p.name, start, stop)
                for axis, spaces in axes:
                    parts = [_part_of(t, axis, spaces, space) for t in (rows, anchor_rows)]
                    accumulated.add(*neuron_rows(parts, [axis, axis]))
        return accumulated.cost()

    def _merge(self, node: Merge) -> None:
        if node.defines in self.stream:
            return  # one plan for the whole stream, solved up front
        beta = self._residual_beta(node)
        for model in self.others:
            plans = self.plans[model.index]
            plans[node.defines] = merge_plans(plans[node.residual], plans[node.branch], beta)

    # -- pieces --------------------------------------------------------------------------------
    def _load(
        self, model: ParentModel, name: str, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """A tensor (or rows start:stop of it) in float32 on the job's device, whatever its
        stored dtype (recorded)."""
        if not model.has(name):
            raise InputError(f"{model.label}: missing tensor {name!r}")
        tensor = model.checkpoint.rows(model.keys[name], start, stop)
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
        mapped = apply_on_axis(tensor, axis, self._map(plan, role, space))
        if role == "out" and self._temperature_space(space):
            # q.k sums over the model's head_dim d_m and is divided by sqrt(d_m); in the anchor's
            # d_a dims the same logits need q scaled by (d_m / d_a) * sqrt(d_a / d_m)
            mapped = mapped * (plan.shape[0] / plan.shape[1]) ** 0.5
        return mapped

    def _temperature_space(self, space: str) -> bool:
        attention = self.attention.get(space)
        return attention is not None and attention.query == space and self.spec.rectangular == "rms"

    def _map(self, plan: torch.Tensor, role: str, space: str) -> Map:
        """The normalized map of a plan (or its permutation indices), computed once."""
        key = (id(plan), role)
        if key not in self._maps:
            # Only exact solvers produce permutations; checking a plan costs two full passes,
            # so its other role's entry is looked at first.
            permutation = None
            if self.spec.solver == "emd":
                other = self._maps.get((id(plan), "in" if role == "out" else "out"))
                if other is None:
                    permutation = as_permutation(plan)
                elif isinstance(other[1], torch.Tensor):
                    permutation = other[1]
            if permutation is not None:
                mapped = permutation
            else:
                mapped = out_scaled(plan) if role == "out" else in_scaled(plan)
                scale = self._rectangular_scale(plan)
                if scale is not None and role == "out":
                    mapped = mapped.then(scale)
                elif scale is not None and self.spec.rectangular == "rms":
                    mapped = mapped.then(1 / scale)  # consumers undo it
                if self.spec.solver == "emd":  # exact plans are sparse: gathers
                    mapped = GatheredMap.of(mapped) or SparseMap.of(mapped) or mapped
                heads = self._head_count(space)
                if heads and isinstance(mapped, ScaledPlan):
                    mapped = HeadBlockMap.of(mapped, heads) or mapped
            self._maps[key] = (plan, mapped)  # holding the plan keeps its id unique
        return self._maps[key][1]

    def _head_count(self, space: str) -> int:
        """The heads a head-matched space holds (0: not one): query heads for queries and
        what the output projection reads, key/value heads for keys and values."""
        if self.spec.heads == "cross" or not self.attention:
            return 0
        attention = self.attention.get(space)
        if attention is None:
            outputs = {a.output for a in self.attention.values()}
            return self.heads if space in outputs else 0
        return self.heads if space == attention.query else self.groups

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

    def _keep_scale(
        self,
        plan: torch.Tensor,
        model_rows: list[torch.Tensor] | None = None,
        summary: GramCost | None = None,
    ) -> None:
        """RMS preservation: anchor neuron i receives the average sum_j m_ji f_j of the model
        neurons' features f_j (activations, or the defining weights' rows); averaging
        neurons that are not copies of each other shrinks it. Scaled by
        sqrt(sum_j m_ji |f_j|^2) / |sum_j m_ji f_j|, it keeps the mass-weighted RMS of its
        sources; copies of one neuron get exactly 1. The features come as rows, or as the
        squared norms and Gram matrix a streamed cost accumulated (`summary`)."""
        if plan.shape[0] == plan.shape[1] or self.spec.rectangular != "rms":
            return
        mass = out_map(plan)
        if model_rows is not None:
            features = torch.cat([b.float().reshape(b.shape[0], -1) for b in model_rows], 1)
            sources = mass.T @ features.pow(2).sum(1)
            averaged = (mass.T @ features).pow(2).sum(1)
        else:
            assert summary is not None and summary.model_gram is not None
            sources = mass.T @ summary.model_sq
            averaged = ((summary.model_gram @ mass) * mass).sum(0)
        tiny = torch.finfo(mass.dtype).tiny
        scale = (sources.clamp_min(tiny) / averaged.clamp_min(tiny)).sqrt()
        self._scales[id(plan)] = (plan, scale.clamp(max=RMS_SCALE_MAX))

    def _plan(self, model: ParentModel, space: str, current: Current) -> None:
        plans = self.plans[model.index]
        if space in plans:  # the stream's, or solved with its attention block
            return
        if space in self.attention:
            self._solve_attention(model, self.attention[space], current)
        else:
            layer = self.definer[space]
            by_weights = self.spec.alignment != "activations" or layer.tap is None
            if current is None and by_weights:
                summary = self._gram_cost()
                cost = self._blocked_cost(model, layer, space, summary)
                plans[space] = solvers.solve(cost, self.spec.solver, self.spec.reg)
                self._keep_scale(plans[space], summary=summary)
            else:
                model_rows, anchor_rows = self._features(model, space, current)
                cost = block_cost(model_rows, anchor_rows)
                plans[space] = solvers.solve(cost, self.spec.solver, self.spec.reg)
                self._keep_scale(plans[space], model_rows)
            self._record(model, (space,), plans[space], _total_cost(plans[space], cost))
            del cost

    def _solve_attention(self, model: ParentModel, attention: Attention, current: Current):
        """Q, K and V of one block together (they share the head matching), then the space
        the output projection reads, derived from the value plan."""
        plans = self.plans[model.index]
        q, k, v = attention.query, attention.key, attention.value
        rows = {s: self._features(model, s, current) for s in (q, k, v)}
        tied = self.spec.qk == "tied"
        if self.spec.heads == "cross":  # one pool of neurons per space (heads == groups)
            for members in [(q, k), (v,)] if tied else [(q,), (k,), (v,)]:
                cost = block_cost(*([b for s in members for b in rows[s][i]] for i in (0, 1)))
                plan = solvers.solve(cost, self.spec.solver, self.spec.reg)
                self._keep_scale(plan, [b for s in members for b in rows[s][0]])
                for space in members:
                    plans[space] = plan
                self._record(model, members, plan, _total_cost(plan, cost))
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
        label = "+".join(spaces)
        self.records.append(
            PlanRecord(model.index, label, tuple(plan.shape), cost, permutation_distance(plan))
        )
        if self.keep_plans:  # one CPU copy per plan, however many records share it
            if id(plan) not in self._kept_by_plan:
                self._kept_by_plan[id(plan)] = (plan, plan.detach().float().cpu())
            self.kept[f"model{model.index}/{label}"] = self._kept_by_plan[id(plan)][1]

    def _kept(self) -> dict[str, torch.Tensor]:
        """The kept plans of the final records (refinement passes re-solve the same keys)."""
        keys = [f"model{r.model}/{r.space}" for r in self.records]
        return {key: self.kept[key] for key in keys if key in self.kept}

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
        """One stream plan per model; with weights, re-solved after each pass that solves
        the inner plans under it (the pass accumulates the next cost as it goes, so no
        inner plan outlives its layer)."""
        rounds = 1 if self.spec.alignment == "activations" else 1 + STREAM_REFINEMENTS
        costs: dict[int, GramCost] | None = None
        for number in range(rounds):
            for model in self.others:
                if self.spec.alignment == "activations":
                    summary = self._stream_activations(model)
                else:
                    summary = self._stream_weights(model) if costs is None else costs[model.index]
                cost = summary.cost()
                plan = solvers.solve(cost, self.spec.solver, self.spec.reg)
                self._keep_scale(plan, summary=summary)
                for space in self.stream:
                    self.plans[model.index][space] = plan
                if number == rounds - 1:
                    self._record(model, ("stream",), plan, _total_cost(plan, cost))
            if number < rounds - 1:
                costs = {model.index: self._gram_cost() for model in self.others}
                self._walk(emit=False, stream_costs=costs)  # inner plans under this plan

    def _stream_params(self, node: Node, first: bool) -> list[tuple[Param, int]]:
        """The tensors of a layer touching the stream on exactly one axis (which one); in
        the first round only those no inner plan acts on."""
        if not isinstance(node, Layer):
            return []
        found = []
        for p in node.params:
            if self.anchor.is_tied(p) or not self.anchor.has(p.name):
                continue
            streams = [bool(set(axis_spaces(tag)) & self.stream) for tag in p.axes]
            axes = [k for k, in_stream in enumerate(streams) if in_stream]
            inner = [tag for tag, s in zip(p.axes, streams, strict=True) if tag and not s]
            if len(axes) == 1 and not (first and inner):
                found.append((p, axes[0]))
        return found

    def _stream_part(self, model: ParentModel, param: Param, axis: int) -> GramCost:
        """One tensor's share of the stream cost: each stream neuron's weights, other axes
        mapped by the current inner plans (block by block of rows where no plan acts on
        them); `GramCost.add_scaled` weighs every tensor the same."""
        part = self._gram_cost()
        ranges = self._row_blocks(param.name) if param.axes[0] is None else [(0, None)]
        for start, stop in ranges:
            m = self._load(model, param.name, start, stop)
            m = self._align(model, param, m, skip=self.stream)
            a = self._load(self.anchor, param.name, start, stop)
            part.add(*neuron_rows([m, a], [axis, axis]))
        return part

    def _stream_weights(self, model: ParentModel) -> GramCost:
        """The first round's cost between stream neurons, from the tensors touching the
        stream that no inner plan acts on, accumulated tensor by tensor."""
        total = self._gram_cost()
        for node in self.nodes:
            for param, axis in self._stream_params(node, first=True):
                total.add_scaled(self._stream_part(model, param, axis))
        return total

    def _gram_cost(self) -> GramCost:
        return GramCost(model_gram=self.rms_rectangular)

    def _stream_activations(self, model: ParentModel) -> GramCost:
        """The stream's activations at every residual addition, each tap at unit scale,
        accumulated tap by tap (a spilled tap is read when its turn comes: the taps of every
        layer are never held together)."""
        taps = dict.fromkeys(
            t
            for n in self.nodes
            if isinstance(n, Merge)
            for t in (n.residual_tap, n.branch_tap)
            if t is not None
        )
        summary = self._gram_cost()
        for tap in taps:
            model_rows, anchor_rows = (
                rows / rows.pow(2).mean().sqrt().clamp_min(1e-12)
                for rows in (self.acts[model.index][tap], self.acts[self.anchor.index][tap])
            )
            summary.add(model_rows.T, anchor_rows.T)  # (tokens, n) -> a row per neuron
        return summary

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


def _total_cost(plan: torch.Tensor, cost: torch.Tensor) -> float:
    """<plan, cost>: the transport cost a plan pays (one pass, no product matrix)."""
    return float(torch.dot(plan.reshape(-1), cost.to(plan.dtype).reshape(-1)))


def _collector(anchor: ParentModel, into: dict[str, torch.Tensor]) -> Sink:
    """A sink that assembles the fused tensors in memory (row blocks into whole tensors)."""

    def collect(name: str, tensor: torch.Tensor, row: int) -> None:
        shape = anchor.checkpoint.shape(anchor.keys[name])
        if tuple(tensor.shape) == tuple(shape):
            into[name] = tensor
            return
        if name not in into:
            into[name] = torch.empty(shape, dtype=tensor.dtype)
        into[name][row : row + len(tensor)] = tensor

    return collect


def _parts(tensor: torch.Tensor, axis: int, count: int) -> tuple[torch.Tensor, ...]:
    """The equal consecutive parts of a fused axis (GPT-2's Q, K, V)."""
    if tensor.shape[axis] % count:
        raise InputError(f"a fused axis of size {tensor.shape[axis]} is not {count} equal parts")
    return tensor.chunk(count, axis)


def _part_of(tensor: torch.Tensor, axis: int, spaces: tuple[str, ...], space: str):
    return tensor if len(spaces) == 1 else _parts(tensor, axis, len(spaces))[spaces.index(space)]
