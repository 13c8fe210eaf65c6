"""Head-aware alignment for multi-head attention.

The paper's cross-head alignment (sec. 4.2.2) treats the H*d outputs of Q, K and V as one
pool of neurons, so a plan may move a dimension from one head to another; that breaks the
per-head softmax even for hard plans. Here heads are matched one-to-one first (by how close each
dimension of one head is to the nearest of the other, summed over Q/K and V), then the
dimensions inside each matched pair are aligned by the chosen solver. Q, K and V share the
head matching, so each head's attention pattern still applies to its own values; Q and K
share the within-head plan when tied, which keeps q.k invariant under hard alignment.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from . import solvers
from .cost import euclidean, normalized


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
        # One 2-D distance matrix, viewed per head pair: a broadcast batched product would
        # copy both operands once per pair.
        full = euclidean(model_features, anchor_features)  # (H*d_m, H*d_a)
        pairs = full.reshape(heads, d_m, heads, d_a).permute(0, 2, 1, 3)  # (H_m, H_a, d_m, d_a)
        within.append(normalized(pairs))

    # Head pair cost: how far each dimension is from its nearest partner in the other head,
    # both ways (a cheap bound on the within-head matching cost; zero for a permuted head).
    head_cost = sum((cost.amin(-1).mean(-1) + cost.amin(-2).mean(-1)) / 2 for cost in within)
    head_rows, head_cols = linear_sum_assignment(head_cost.detach().cpu().double().numpy())

    plans, costs = [], []
    for cost in within:
        _, _, d_m, d_a = cost.shape
        pairs = cost[torch.as_tensor(head_rows), torch.as_tensor(head_cols)]  # (H, d_m, d_a)
        blocks = solvers.solve(pairs, solver, reg) / heads  # all matched pairs at once
        plan = torch.zeros(heads * d_m, heads * d_a, dtype=cost.dtype, device=cost.device)
        for block, hm, ha in zip(blocks, head_rows, head_cols, strict=True):
            plan[hm * d_m : (hm + 1) * d_m, ha * d_a : (ha + 1) * d_a] = block
        plans.append(plan)
        costs.append(float((blocks * pairs).sum()))
    return plans, costs
