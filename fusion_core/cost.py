"""Ground costs between neurons of the anchor and of another model (normalized, sec. D.3)."""

from __future__ import annotations

import torch


def neuron_rows(tensors: list[torch.Tensor], axes: list[int]) -> list[torch.Tensor]:
    """Per tensor, (n, F_t): each neuron's row, the neuron axis moved first (views where the
    layout allows; the blocks are never concatenated, see `block_cost`)."""
    return [
        t.movedim(axis, 0).reshape(t.shape[axis], -1) for t, axis in zip(tensors, axes, strict=True)
    ]


class GramCost:
    """`pairwise_cost` of feature rows concatenated over blocks, accumulated block by block
    without building them: squared norms and one Gram matrix (in place), combined once at
    the end. Blocks may come one tensor at a time, or in slices of a tensor's rows."""

    def __init__(self, model_gram: bool = False) -> None:
        self.gram: torch.Tensor | None = None
        self.model_sq: torch.Tensor | float = 0.0
        self.anchor_sq: torch.Tensor | float = 0.0
        # The model neurons' own Gram matrix, when asked: what the RMS convention of
        # rectangular maps needs (the norm of averaged neurons) once the rows are gone.
        self.track_model = model_gram
        self.model_gram: torch.Tensor | None = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.float(), y.float()
        self.model_sq = self.model_sq + _squared_norms(x)
        self.anchor_sq = self.anchor_sq + _squared_norms(y)
        self.gram = x @ y.T if self.gram is None else self.gram.addmm_(x, y.T)
        if self.track_model:
            own = self.model_gram
            self.model_gram = x @ x.T if own is None else own.addmm_(x, x.T)

    def add_scaled(self, part: GramCost) -> None:
        """Another accumulation, its model and anchor features each scaled to unit norm."""
        if part.gram is None:
            return
        sx = float(torch.as_tensor(part.model_sq).sum().sqrt().clamp_min(1e-12))
        sy = float(torch.as_tensor(part.anchor_sq).sum().sqrt().clamp_min(1e-12))
        self.model_sq = self.model_sq + part.model_sq / sx**2
        self.anchor_sq = self.anchor_sq + part.anchor_sq / sy**2
        gram = part.gram.div_(sx * sy)
        self.gram = gram if self.gram is None else self.gram.add_(gram)
        if part.model_gram is not None:
            own = part.model_gram.div_(sx**2)
            self.model_gram = own if self.model_gram is None else self.model_gram.add_(own)

    def cost(self) -> torch.Tensor:
        if self.gram is None:
            raise ValueError("no features to compare")
        squared = self.gram.mul_(-2).add_(self.model_sq[:, None]).add_(self.anchor_sq[None, :])
        self.gram = None
        return normalized(squared.clamp_min_(0).sqrt_(), in_place=True)


def _squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """Each row's squared norm: `vector_norm` for contiguous rows (no squared copy: ~6x
    faster), an elementwise square where rows are strided (a transposed table's columns)."""
    if rows.is_contiguous():
        return torch.linalg.vector_norm(rows, dim=-1).square_()
    return rows.pow(2).sum(-1)


def block_cost(model_blocks: list[torch.Tensor], anchor_blocks: list[torch.Tensor]) -> torch.Tensor:
    """`pairwise_cost` of the concatenated rows (see `GramCost`)."""
    accumulated = GramCost()
    for x, y in zip(model_blocks, anchor_blocks, strict=True):
        accumulated.add(x, y)
    return accumulated.cost()


def pairwise_cost(model_features: torch.Tensor, anchor_features: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (n_model, n_anchor), divided by their max so the regularizer has
    the same meaning at every layer and scale."""
    return normalized(euclidean(model_features, anchor_features))


def euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise distances over the last axis, batched over leading ones, via one matrix
    product (about twice as fast as torch.cdist on CPU)."""
    squared = (
        x.pow(2).sum(-1)[..., :, None]
        + y.pow(2).sum(-1)[..., None, :]
        - 2 * (x @ y.transpose(-1, -2))
    )
    return squared.clamp_min_(0).sqrt_()


def normalized(cost: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """The cost divided by its max (`in_place`: a temporary the caller gives up)."""
    scale = cost.max().clamp_min(torch.finfo(cost.dtype).tiny)
    return cost.div_(scale) if in_place else cost / scale
