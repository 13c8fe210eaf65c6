"""Head-aware alignment for multi-head attention.

The paper's cross-head alignment (sec. 4.2.2) treats the H*d outputs of Q, K and V as one
pool of neurons, so a plan may move a dimension from one head to another; that breaks the
per-head softmax even for hard plans. Here heads are matched one-to-one first, then the
dimensions inside each matched pair are aligned by the chosen solver. Q, K and V share the
head matching, so each head's attention still applies to its own values; Q and K share the
within-head plan when tied, which keeps q.k invariant under hard alignment.

Two constraints of decoder attention:
- grouped-query attention (G key/value heads, each read by r = H/G query heads): key/value
  heads are matched as whole groups, and query heads only within the matched group pair;
- rotary embeddings rotate query/key dimensions in frequency pairs, so no plan inside a Q/K
  head preserves q.k: those heads move whole (`inside=False`). Values may still be aligned
  inside their heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import solvers
from .assignment import match
from .cost import euclidean, normalized

Pairs = tuple[np.ndarray, np.ndarray]  # (model heads, anchor heads), matched one-to-one


@dataclass
class HeadSet:
    """One head-structured space (or Q and K together when tied), solved as one plan."""

    spaces: tuple[str, ...]
    model: torch.Tensor  # (heads * d_m, F): a row of features per dimension
    anchor: torch.Tensor  # (heads * d_a, F)
    per_group: bool = False  # its heads are the key/value heads (G), not the query heads (H)
    inside: bool = True  # align dimensions inside matched heads; False: whole heads only


@dataclass
class HeadPlans:
    plans: list[torch.Tensor]  # one per set, (heads * d_m, heads * d_a), block-structured
    costs: list[float]
    query_pairs: Pairs
    group_pairs: Pairs


def head_matched_plans(
    sets: list[HeadSet], heads: int, groups: int, solver: str, reg: float | None
) -> HeadPlans:
    """Match heads (groups first), then align dimensions inside each matched pair."""
    query_cost = torch.zeros(heads, heads, dtype=torch.float64)
    group_cost = torch.zeros(groups, groups, dtype=torch.float64)
    within = []
    for s in sets:
        n = groups if s.per_group else heads
        pairs, head_cost = _pair_costs(s, n)
        within.append(pairs)
        (group_cost if s.per_group else query_cost).add_(head_cost.detach().cpu().double())
    query_pairs, group_pairs = match_heads(query_cost, group_cost)

    plans, costs = [], []
    for s, pairs in zip(sets, within, strict=True):
        rows, cols = group_pairs if s.per_group else query_pairs
        matched = pairs[torch.as_tensor(rows), torch.as_tensor(cols)]  # (n, d_m, d_a) | (n, d)
        n = len(rows)
        if s.inside:
            blocks = solvers.solve(matched, solver, reg) / n  # all matched pairs at once
        else:
            d = matched.shape[-1]
            eye = torch.eye(d, dtype=matched.dtype, device=matched.device)
            blocks, matched = eye.expand(n, d, d) / (n * d), torch.diag_embed(matched)
        plans.append(_assemble(blocks, rows, cols))
        costs.append(float((blocks * matched).sum()))
    return HeadPlans(plans, costs, query_pairs, group_pairs)


def _pair_costs(s: HeadSet, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head pair, the normalized costs between their dimensions, and a head-pair cost."""
    d_m, d_a = s.model.shape[0] // n, s.anchor.shape[0] // n
    if s.inside:
        # One 2-D distance matrix, viewed per head pair: a broadcast batched product would
        # copy both operands once per pair.
        full = euclidean(s.model, s.anchor)  # (n*d_m, n*d_a)
        pairs = normalized(full.reshape(n, d_m, n, d_a).permute(0, 2, 1, 3))  # (n, n, d_m, d_a)
        # How far each dimension is from its nearest partner in the other head, both ways (a
        # cheap bound on the within-head matching cost; zero for a permuted head).
        return pairs, (pairs.amin(-1).mean(-1) + pairs.amin(-2).mean(-1)) / 2
    if d_m != d_a:
        raise ValueError(f"whole-head alignment needs equal head widths ({d_m} vs {d_a})")
    model = s.model.reshape(n, d_m, -1).transpose(0, 1)  # (d, n, F)
    anchor = s.anchor.reshape(n, d_a, -1).transpose(0, 1)
    pairs = normalized(euclidean(model, anchor)).permute(1, 2, 0)  # (n, n, d): dim j <-> j
    return pairs, pairs.mean(-1)


def match_heads(query_cost: torch.Tensor, group_cost: torch.Tensor) -> tuple[Pairs, Pairs]:
    """Exact assignments: key/value groups, then query heads within each matched group pair
    (a group pair's cost includes the best matching of its query heads)."""
    heads, groups = query_cost.shape[0], group_cost.shape[0]
    if heads == groups:
        rows, cols = match((query_cost + group_cost).numpy())
        return (rows, cols), (rows, cols)
    ratio = heads // groups
    blocks = query_cost.reshape(groups, ratio, groups, ratio).permute(0, 2, 1, 3).numpy()
    inner_cost = np.zeros((groups, groups))
    inner: dict[tuple[int, int], np.ndarray] = {}
    for gm in range(groups):  # G^2 small (r x r) assignments: heads, not neurons
        for ga in range(groups):
            r, c = match(blocks[gm, ga])
            inner_cost[gm, ga], inner[gm, ga] = blocks[gm, ga][r, c].sum(), c
    g_rows, g_cols = match(group_cost.numpy() + inner_cost)
    q_rows = np.concatenate([gm * ratio + np.arange(ratio) for gm in g_rows])
    q_cols = np.concatenate(
        [ga * ratio + inner[gm, ga] for gm, ga in zip(g_rows, g_cols, strict=True)]
    )
    order = np.argsort(q_rows)
    return (q_rows[order], q_cols[order]), (g_rows, g_cols)


def _assemble(blocks: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
    """(n, d_m, d_a) blocks placed at their matched head pairs of an (n*d_m, n*d_a) plan."""
    n, d_m, d_a = blocks.shape
    plan = torch.zeros(n * d_m, n * d_a, dtype=blocks.dtype, device=blocks.device)
    for block, hm, ha in zip(blocks, rows, cols, strict=True):
        plan[hm * d_m : (hm + 1) * d_m, ha * d_a : (ha + 1) * d_a] = block
    return plan


def output_plan(
    value_plan: torch.Tensor, query_pairs: Pairs, heads: int, groups: int
) -> torch.Tensor:
    """The TM of what the output projection reads (per query head, the values of its group):
    for each matched query head pair, the value plan's block between their groups."""
    if groups == heads:
        return value_plan
    ratio = heads // groups
    d_m, d_a = value_plan.shape[0] // groups, value_plan.shape[1] // groups
    blocks = torch.stack(
        [
            value_plan[gm * d_m : (gm + 1) * d_m, ga * d_a : (ga + 1) * d_a]
            for gm, ga in zip(query_pairs[0] // ratio, query_pairs[1] // ratio, strict=True)
        ]
    )
    return _assemble(blocks / ratio, *query_pairs)
