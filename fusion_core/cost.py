"""Ground costs between neurons of the anchor and of another model (normalized, sec. D.3)."""

from __future__ import annotations

import torch


def neuron_rows(tensors: list[torch.Tensor], axes: list[int]) -> list[torch.Tensor]:
    """Per tensor, (n, F_t): each neuron's row, the neuron axis moved first (views where the
    layout allows; the blocks are never concatenated, see `block_cost`)."""
    return [
        t.movedim(axis, 0).reshape(t.shape[axis], -1) for t, axis in zip(tensors, axes, strict=True)
    ]


def block_cost(model_blocks: list[torch.Tensor], anchor_blocks: list[torch.Tensor]) -> torch.Tensor:
    """`pairwise_cost` of the concatenated rows, accumulated block by block without building
    them: squared norms and one Gram matrix (in place), combined once at the end."""
    gram = None
    model_sq, anchor_sq = 0.0, 0.0
    for x, y in zip(model_blocks, anchor_blocks, strict=True):
        x, y = x.float(), y.float()
        model_sq = model_sq + x.pow(2).sum(-1)
        anchor_sq = anchor_sq + y.pow(2).sum(-1)
        gram = x @ y.T if gram is None else gram.addmm_(x, y.T)
    squared = gram.mul_(-2).add_(model_sq[:, None]).add_(anchor_sq[None, :])
    return normalized(squared.clamp_min_(0).sqrt_())


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


def normalized(cost: torch.Tensor) -> torch.Tensor:
    return cost / cost.max().clamp_min(torch.finfo(cost.dtype).tiny)
