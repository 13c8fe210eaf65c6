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
    """`pairwise_cost` of the concatenated rows, summed block by block without building them."""
    squared = None
    for x, y in zip(model_blocks, anchor_blocks, strict=True):
        x, y = x.float(), y.float()
        part = x.pow(2).sum(-1)[:, None] + y.pow(2).sum(-1)[None, :] - 2 * (x @ y.T)
        squared = part if squared is None else squared.add_(part)
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
