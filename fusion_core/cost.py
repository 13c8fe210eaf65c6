"""Ground costs between neurons of the anchor and of another model (normalized, sec. D.3)."""

from __future__ import annotations

import torch


def neuron_features(tensors: list[torch.Tensor], axes: list[int]) -> torch.Tensor:
    """(n, F): each neuron's row across all tensors, the neuron axis moved first."""
    rows = [
        t.movedim(axis, 0).reshape(t.shape[axis], -1) for t, axis in zip(tensors, axes, strict=True)
    ]
    return torch.cat([r.float() for r in rows], dim=1)


def pairwise_cost(model_features: torch.Tensor, anchor_features: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (n_model, n_anchor), divided by their max so the regularizer has
    the same meaning at every layer and scale."""
    cost = torch.cdist(model_features[None], anchor_features[None])[0]
    return cost / cost.max().clamp_min(torch.finfo(cost.dtype).tiny)
