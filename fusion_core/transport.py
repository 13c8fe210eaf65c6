"""Transport maps: turning an OT plan into the matrices that move tensors between models.

A plan P (n_model, n_anchor) has row sums 1/n_model and column sums 1/n_anchor.
- Aligning a layer's *outputs* (values that live on neurons), each anchor neuron receives
  one unit of mass: the plan normalized by columns (a weighted average of model neurons).
- Mapping a layer's *inputs* (weights that consume neurons), each model neuron is fully
  reconstructed from anchor neurons: the plan normalized by rows.
For equal widths both are the same matrix (n * P); for a permutation, the permutation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScaledPlan:
    """The map diag(left) @ plan @ diag(right), never built: normalizing a 3072^2 plan for
    each role would copy it twice, while scaling the tensor before the product and the
    result after it costs O(n F). `left` scales model neurons, `right` anchor neurons."""

    plan: torch.Tensor
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    def then(self, scale: torch.Tensor) -> ScaledPlan:
        """This map, each anchor neuron's output times `scale`."""
        right = scale if self.right is None else self.right * scale
        return ScaledPlan(self.plan, self.left, right)

    def apply(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        moved = tensor.movedim(axis, -1)
        if self.left is not None:
            moved = moved * self.left.to(moved.dtype)
        product = moved @ self.plan.to(moved.dtype)
        if self.right is not None:
            product.mul_(self.right.to(product.dtype))
        return product.movedim(-1, axis)


@dataclass(frozen=True)
class GatheredMap:
    """A map whose every anchor neuron draws on at most k model neurons (exact plans: merged
    permutations, network-simplex plans): anchor neuron j gets sum_t weight[t, j] times
    model neuron index[t, j], k gathers instead of a dense product."""

    index: torch.Tensor  # (k, n_anchor) long
    weight: torch.Tensor  # (k, n_anchor)

    @staticmethod
    def of(scaled: ScaledPlan, most: int = 4) -> GatheredMap | None:
        """The scaled plan as gathers, when no anchor neuron has more than `most` sources."""
        plan = scaled.plan
        k = int((plan != 0).sum(0).amax()) if plan.numel() else 0
        if not 0 < k <= most or plan.shape[0] < 2 * most:
            return None
        weight, index = plan.topk(k, dim=0)
        if scaled.left is not None:
            weight = weight * scaled.left[index]
        if scaled.right is not None:
            weight = weight * scaled.right[None, :]
        return GatheredMap(index, weight)

    def apply(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        shape = [1] * tensor.dim()
        shape[axis] = -1
        total = None
        for index, weight in zip(self.index, self.weight, strict=True):
            part = tensor.index_select(axis, index).mul_(weight.to(tensor.dtype).view(shape))
            total = part if total is None else total.add_(part)
        return total


@dataclass(frozen=True)
class SparseMap:
    """An exact plan with more sources per anchor neuron than gathers pay for: the residual
    stream's plan, averaged with a new permutation at every merge, gains up to one source
    per merge. Applied as a sparse (CSR) product, ~4x faster than the dense one at 1/32 of
    the entries."""

    matrix: torch.Tensor  # (n_anchor, n_model) sparse CSR: the scaled map, transposed

    @staticmethod
    def of(scaled: ScaledPlan, density: float = 1 / 32) -> SparseMap | None:
        plan = scaled.plan
        if plan.dim() != 2 or int(torch.count_nonzero(plan)) > density * plan.numel():
            return None
        transposed = plan.T.contiguous()
        anchor, model = transposed.nonzero().unbind(1)  # row-major: CSR order
        values = transposed[anchor, model]
        if scaled.left is not None:
            values = values * scaled.left[model]
        if scaled.right is not None:
            values = values * scaled.right[anchor]
        starts = torch.zeros(plan.shape[1] + 1, dtype=torch.long, device=plan.device)
        starts[1:] = torch.bincount(anchor, minlength=plan.shape[1]).cumsum(0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": it is tested here
            warnings.simplefilter("ignore", UserWarning)
            matrix = torch.sparse_csr_tensor(starts, model, values, size=transposed.shape)
        return SparseMap(matrix)

    def apply(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        moved = tensor.movedim(axis, 0)
        rows = moved.reshape(moved.shape[0], -1).contiguous()  # (n_model, R)
        out = self.matrix.to(rows.dtype) @ rows  # (n_anchor, R)
        return out.reshape(-1, *moved.shape[1:]).movedim(0, axis)


@dataclass(frozen=True)
class HeadBlockMap:
    """A map of head-matched attention spaces: each anchor head draws on one model head
    through a small (d_m, d_a) block, so applying it is a gather of heads and a batched
    product, `heads` times fewer flops than the dense (heads d_m, heads d_a) plan."""

    source: torch.Tensor  # (heads,) long: the model head of each anchor head
    blocks: torch.Tensor  # (heads, d_m, d_a), scaled as the map

    @staticmethod
    def of(scaled: ScaledPlan, heads: int) -> HeadBlockMap | None:
        """The scaled plan as head blocks, when every anchor head has exactly one model head
        with nonzero mass (plans from `heads.head_matched_plans`), else None."""
        plan = scaled.plan
        n_model, n_anchor = plan.shape
        if heads < 2 or n_model % heads or n_anchor % heads:
            return None
        d_m, d_a = n_model // heads, n_anchor // heads
        by_head = plan.reshape(heads, d_m, heads, d_a).transpose(1, 2)  # (model, anchor, d_m, d_a)
        used = by_head.ne(0).flatten(2).any(-1)  # (model head, anchor head)
        if not bool((used.sum(0) == 1).all()):
            return None
        source = used.float().argmax(0)
        blocks = by_head[source, torch.arange(heads, device=plan.device)]
        if scaled.left is not None:
            blocks = blocks * scaled.left.view(heads, d_m)[source][:, :, None]
        if scaled.right is not None:
            blocks = blocks * scaled.right.view(heads, 1, d_a)
        return HeadBlockMap(source, blocks.contiguous())

    def apply(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        heads, d_m, d_a = self.blocks.shape
        moved = tensor.movedim(axis, -1)
        lead = moved.shape[:-1]
        rows = moved.reshape(-1, heads, d_m).index_select(1, self.source)  # (R, heads, d_m)
        out = torch.bmm(rows.transpose(0, 1), self.blocks.to(rows.dtype))  # (heads, R, d_a)
        return out.transpose(0, 1).reshape(*lead, heads * d_a).movedim(-1, axis)


def out_scaled(plan: torch.Tensor) -> ScaledPlan:
    """The output map: each anchor neuron's column normalized to one unit of mass."""
    return ScaledPlan(plan, right=1 / plan.sum(dim=0).clamp_min(torch.finfo(plan.dtype).tiny))


def in_scaled(plan: torch.Tensor) -> ScaledPlan:
    """The input map: each model neuron's row normalized, so it is fully reconstructed."""
    return ScaledPlan(plan, left=1 / plan.sum(dim=1).clamp_min(torch.finfo(plan.dtype).tiny))


def out_map(plan: torch.Tensor) -> torch.Tensor:
    """`out_scaled` built as a matrix (n_model, n_anchor)."""
    return plan * out_scaled(plan).right[None, :]


def in_map(plan: torch.Tensor) -> torch.Tensor:
    """`in_scaled` built as a matrix (n_model, n_anchor)."""
    return plan * in_scaled(plan).left[:, None]


def apply_on_axis(
    tensor: torch.Tensor,
    axis: int,
    matrix: torch.Tensor | ScaledPlan | GatheredMap | HeadBlockMap | SparseMap,
) -> torch.Tensor:
    """Contract `axis` (size n_model) of `tensor` with `matrix` (n_model, n_anchor), or, for
    a permutation given as indices (n_anchor,), gather along it."""
    if not isinstance(matrix, torch.Tensor):  # the map types apply themselves
        return matrix.apply(tensor, axis)
    if matrix.dtype == torch.long:
        return tensor.index_select(axis, matrix)
    moved = tensor.movedim(axis, -1)
    return (moved @ matrix.to(moved.dtype)).movedim(-1, axis)


def as_permutation(plan: torch.Tensor) -> torch.Tensor | None:
    """For a (scaled) permutation plan, the model neuron feeding each anchor neuron; else
    None. Hard plans are then applied by gathering: O(n) instead of a dense O(n^2) product."""
    n = plan.shape[0]
    # Counting is one pass without allocation, and rejects every soft plan.
    if plan.shape[1] != n or int(torch.count_nonzero(plan)) != n:
        return None
    # n nonzeros, the largest of each row positive: one per row. A permutation if the
    # columns are then distinct.
    cols = plan.argmax(1)
    rows = torch.arange(n, device=plan.device)
    one_per_row = bool((plan[rows, cols] > 0).all())
    if not (one_per_row and bool((torch.bincount(cols, minlength=n) == 1).all())):
        return None
    return torch.empty_like(cols).scatter_(0, cols, rows)


def identity_plan(n: int, device: torch.device | str, dtype=torch.float32) -> torch.Tensor:
    return torch.eye(n, device=device, dtype=dtype) / n


def merge_plans(
    residual: torch.Tensor, branch: torch.Tensor, beta: torch.Tensor | float
) -> torch.Tensor:
    """Eq. 1: the residual's TM weighted by beta (per anchor neuron or scalar), the branch's
    by 1 - beta. A convex combination of plans keeps both marginals."""
    return residual * beta + branch * (1 - beta)


def permutation_distance(plan: torch.Tensor) -> float:
    """0 for a (scaled) permutation, up to ~1 for the uniform plan: 1 - mean over anchor
    neurons of the largest share of its column mass. A diagnostic of hardness (the column
    maxima of `out_map`, without building it)."""
    share = plan.amax(0) / plan.sum(0).clamp_min(torch.finfo(plan.dtype).tiny)
    return float(1 - share.mean())
