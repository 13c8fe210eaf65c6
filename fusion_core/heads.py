"""Head-aware alignment for multi-head attention.

The paper's cross-head alignment (sec. 4.2.2) treats the H*d outputs of Q, K and V as one
pool of neurons, so a plan may move a dimension from one head to another; that breaks the
per-head softmax even for hard plans. Here heads are matched one-to-one first (the cost of a
head pair is its optimal within-head matching cost, summed over Q/K and V), then the
dimensions inside each matched pair are aligned by the chosen solver. Q, K and V share the
head matching, so each head's attention pattern still applies to its own values; Q and K
share the within-head plan when tied, which keeps q.k invariant under hard alignment.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from . import solvers


def head_matched_plans(
    feature_sets: list[tuple[torch.Tensor, torch.Tensor]],
    heads: int,
    solver: str,
    reg: float | None,
) -> tuple[list[torch.Tensor], list[float]]:
    """One plan (n_model, n_anchor) per feature set, block-structured by matched heads.

    feature_sets: (model_features (H*d_m, F), anchor_features (H*d_a, F)) per set, e.g.
    [Q and K rows concatenated, V rows]. Returns the plans and their transport costs.
    """
    within = []
    for model_features, anchor_features in feature_sets:
        d_m, d_a = model_features.shape[0] // heads, anchor_features.shape[0] // heads
        m = model_features.reshape(heads, d_m, -1)
        a = anchor_features.reshape(heads, d_a, -1)
        cost = torch.cdist(m[:, None], a[None, :])  # (H_model, H_anchor, d_m, d_a)
        within.append(cost / cost.max().clamp_min(torch.finfo(cost.dtype).tiny))

    # Head pair cost: the optimal hard within-head matching cost, summed over sets.
    head_cost = torch.zeros(heads, heads, dtype=torch.float64)
    for cost in within:
        host = cost.detach().to("cpu", torch.float64).numpy()
        for hm in range(heads):
            for ha in range(heads):
                rows, cols = linear_sum_assignment(host[hm, ha])
                head_cost[hm, ha] += host[hm, ha][rows, cols].mean()
    head_rows, head_cols = linear_sum_assignment(head_cost.numpy())

    plans, costs = [], []
    for cost in within:
        _, _, d_m, d_a = cost.shape
        plan = torch.zeros(heads * d_m, heads * d_a, dtype=cost.dtype, device=cost.device)
        total = 0.0
        for hm, ha in zip(head_rows, head_cols, strict=True):
            block = solvers.solve(cost[hm, ha], solver, reg) / heads
            plan[hm * d_m : (hm + 1) * d_m, ha * d_a : (ha + 1) * d_a] = block
            total += float((block * cost[hm, ha]).sum())
        plans.append(plan)
        costs.append(total)
    return plans, costs
