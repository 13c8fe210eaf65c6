"""Exact linear assignment: the EMD of square problems with uniform marginals.

With n model and n anchor neurons of mass 1/n each, an optimal transport plan is a scaled
permutation (Birkhoff), so exact EMD is a linear assignment problem. It is solved by the
Jonker-Volgenant shortest augmenting path algorithm (lapx's Rust LAPJV), an exact primal-dual
method that keeps its potentials and path lengths in float64 even for float32 costs: the
result is optimal for the given costs up to float64 rounding, like scipy's solver, and about
10x faster than it on the nearly uniform costs of random-init 3072-wide layers. Batches run
on as many threads as torch uses.

On a GPU, problems of AUCTION_MIN_N neurons and more are solved where the costs are, by an
auction (`auction_assign`) in exact integer arithmetic, optimal for the given costs by the
auction's eps-complementary slackness theorem. JV's time grows as ~n^2.6 on one host core
(0.28 s at 3072, 3.7 s at 8192, 14.5 s at Llama-3-8B's 14336, random-init costs), while the
auction's rounds grow about linearly (1.7-2.4 n) and each is a few dozen kernel launches
and one host sync (docs/benchmarks.md, "Exact assignment on a GPU?").
"""

from __future__ import annotations

import numpy as np
import torch
from lap import lapjvr, lapjvr_batch

from .compat import AUCTION_MIN_N
from .errors import FusionError


def assign(cost: torch.Tensor) -> torch.Tensor:
    """For square costs (..., n, n), the anchor column of each model row in an optimal
    assignment: (..., n) indices on the cost's device."""
    *batch, n, m = cost.shape
    if n != m:
        raise ValueError(f"linear assignment needs square costs, got {n}x{m}")
    if cost.numel() == 0:
        return torch.zeros(*batch, n, dtype=torch.long, device=cost.device)
    work = cost.detach().reshape(-1, n, n)
    if work.dtype not in (torch.float32, torch.float64):
        work = work.to(torch.float64)  # half precisions and integers, exactly
    low, high = work.aminmax(dim=-1, keepdim=True)  # NaN or inf anywhere shows here
    if not (bool(torch.isfinite(low).all()) and bool(torch.isfinite(high).all())):
        raise FusionError(f"exact OT got a {n}x{m} cost with non-finite entries")
    # The auction takes the costs as they are: JV's row offsets below would leave differences
    # of a few ulps, whose fine granule makes the integer form too wide for int64.
    if auction_suits(work.device, n):
        columns = auction_assign(work)
        if columns is not None:
            return columns.reshape(*batch, n).to(cost.device)
    # Row offsets do not change the optimal assignment, and JV's column reduction stalls
    # when a few rows are cheap for every column (distances between random-init neurons):
    # without them it is ~1.4x faster. Subtracting a row's minimum is exact (Sterbenz) where
    # the row lies within [min, 2 min]; other rows keep their costs.
    exact = (low > 0) & (high <= 2 * low)
    if bool(exact.any()):
        work = work - torch.where(exact, low, 0)
    problems = work.to("cpu").contiguous().numpy()
    if len(problems) == 1:
        rows, cols = lapjvr(problems[0], return_cost=False)
        rows_list, cols_list = [rows], [cols]
    else:
        threads = min(torch.get_num_threads(), len(problems))
        rows_list, cols_list = lapjvr_batch(problems, return_cost=False, n_threads=threads)
    columns = np.empty((len(problems), n), dtype=np.int64)
    for k, (rows, cols) in enumerate(zip(rows_list, cols_list, strict=True)):
        columns[k, rows] = cols
    return torch.from_numpy(columns).reshape(*batch, n).to(cost.device)


def auction_suits(device: torch.device, n: int) -> bool:
    """Whether `assign` tries the auction first: on a GPU, for large problems."""
    return device.type == "cuda" and n >= AUCTION_MIN_N


# Mantissa bits: a nonzero value with exponent e (frexp) is a multiple of 2^(e - bits).
_MANTISSA_BITS = {torch.float16: 11, torch.bfloat16: 8, torch.float32: 24, torch.float64: 53}
# Integer costs stay below 2^55. A round raises the largest price by at most the span plus
# eps, and every value the auction forms is at most that price plus the span: with prices
# checked against 2^61 every 64 rounds, nothing reaches 2^63.
_COST_BITS = 55
_PRICE_LIMIT = 2**61
_CHECK_EVERY = 64
_FIRST_SHIFT, _SHIFT_STEP = 2, 3  # eps = span / 2^2, then divided by 2^3 a phase
# Entries of one bidding chunk: its costs and its prices, 256 MiB each of int64. With the
# costs themselves (8 n^2 bytes) that stays within the 20 bytes an entry the planner counts
# for the conversion to integers, from n = 8192 on.
_BID_ENTRIES = 1 << 25


def integer_costs(cost: torch.Tensor) -> torch.Tensor | None:
    """Costs (b, n, n) as int64 multiples of 2^k > n, in each problem's own power-of-two
    granule and shifted to start at 0: the same optimal assignments, no rounding. None
    when they would not fit (costs spanning too many binary orders, float64 costs)."""
    bits = _MANTISSA_BITS.get(cost.dtype)
    if bits is None:
        return None
    b, n, _ = cost.shape
    margin = n.bit_length()  # 2^margin > n
    magnitude = cost.detach().abs().reshape(b, -1)
    smallest = torch.where(magnitude > 0, magnitude, torch.inf).amin(1)
    smallest = torch.where(torch.isfinite(smallest), smallest, 1.0).to(torch.float64)
    _, low = torch.frexp(smallest)  # every value is a multiple of 2^(low - bits)
    _, high = torch.frexp(magnitude.amax(1).to(torch.float64))  # ...and below 2^high
    del magnitude
    # In granules the values lie in (-2^(high-low+bits), 2^(high-low+bits)): shifted to
    # start at 0 they take one more bit, and the optimality margin `margin` more.
    if int((high - low).amax()) + bits + 1 + margin > _COST_BITS:
        return None
    units = torch.empty(cost.shape, dtype=torch.int64, device=cost.device)
    for k in range(b):  # one float64 problem at a time: below 2^52 (margin >= 2), exact
        units[k] = cost[k].to(torch.float64).ldexp_(bits - low[k]).to(torch.int64)
        units[k] -= units[k].amin()
    return units.bitwise_left_shift_(margin)


def auction_assign(cost: torch.Tensor, max_rounds: int | None = None) -> torch.Tensor | None:
    """For square costs (b, n, n), the column of each row in an optimal assignment (b, n),
    on the costs' device; None when the costs do not fit the integer form, prices grow out
    of range or the rounds run out (the caller then uses JV).

    Bertsekas' forward auction with eps scaling, every free row of every problem bidding in
    the same round. The integer costs are multiples of 2^k > n and the last phase bids with
    eps = 1, so the final assignment, within n * eps of the optimum by eps-complementary
    slackness, is optimal: exactly, since integer arithmetic does not round.
    """
    b, n, m = cost.shape
    if n != m:
        raise ValueError(f"linear assignment needs square costs, got {n}x{m}")
    device = cost.device
    if n < 2:
        return torch.zeros(b, n, dtype=torch.long, device=device)
    units = integer_costs(cost)
    if units is None:
        return None
    flat = units.view(b * n, n)
    span = units.view(b, -1).amax(1)  # each problem's costs lie in [0, span]
    prices = torch.zeros(b * n, dtype=torch.int64, device=device)
    # Typical costs take 1.7-2.4 n rounds (random-init 3072 to 14336); ties make price wars
    # (integer costs with many ties: 15 n), and past this budget JV is the faster way out.
    budget = max_rounds if max_rounds is not None else 8 * n + 10_000
    rounds, shift = 0, _FIRST_SHIFT
    cells = b * n
    everyone = torch.arange(cells, device=device)
    nobody = torch.tensor(-1, device=device)
    while True:  # phases: eps = span / 4, / 32, ... down to 1
        eps = torch.clamp(span >> shift, min=1)
        # column -> row and row -> column, -1 where none; the extra last cell takes the
        # writes a round makes for nobody, so no round needs a data-dependent shape (each
        # boolean mask would be a host sync: a round has exactly one, finding the free rows)
        owner = torch.full((cells + 1,), -1, dtype=torch.long, device=device)
        column_of = torch.full_like(owner, -1)
        while True:
            free = (column_of[:cells] < 0).nonzero()[:, 0]
            if free.numel() == 0:
                break
            rounds += 1
            if rounds > budget:
                return None
            if rounds % _CHECK_EVERY == 0 and int(prices.max()) > _PRICE_LIMIT:
                return None
            target, bids = _bids(flat, prices, free, n, eps)
            best = torch.full_like(prices, -1).scatter_reduce_(0, target, bids, "amax")
            top = torch.where(bids == best[target], free, -1)  # ties: the highest row wins
            winner = torch.full_like(prices, -1).scatter_reduce_(0, target, top, "amax")
            won = winner >= 0
            outbid = torch.where(won & (owner[:cells] >= 0), owner[:cells], cells)
            column_of.index_put_((outbid,), nobody)
            owner[:cells] = torch.where(won, winner, owner[:cells])
            column_of.index_put_((torch.where(won, winner, cells),), everyone)
            prices = torch.where(won, best, prices)
        if int(prices.max()) > _PRICE_LIMIT:
            return None
        if bool((eps == 1).all()):
            break
        shift += _SHIFT_STEP
    column_of = column_of[:cells]
    return column_of.view(b, n) - torch.arange(b, device=device)[:, None] * n


def _bids(
    flat: torch.Tensor, prices: torch.Tensor, free: torch.Tensor, n: int, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each free row's bid: the column it values most (lowest cost + price, as a flat
    column index), and that column's price raised by its margin over the row's second best
    plus eps. Rows go in chunks, so a phase's first round (every row free) stays within
    _BID_ENTRIES entries."""
    targets, bids = [], []
    step = max(_BID_ENTRIES // n, 1)
    for start in range(0, free.numel(), step):
        rows = free[start : start + step]
        problem = rows // n
        reduced = flat[rows] + prices.view(-1, n)[problem]
        low = reduced.topk(2, dim=1, largest=False)
        target = problem * n + low.indices[:, 0]
        targets.append(target)
        bids.append(prices[target] + (low.values[:, 1] - low.values[:, 0]) + eps[problem])
    if len(targets) == 1:
        return targets[0], bids[0]
    return torch.cat(targets), torch.cat(bids)


def match(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An optimal assignment of a small square cost matrix (heads, not neurons), as
    scipy's `linear_sum_assignment` gives it: (rows 0..n-1, their columns)."""
    work = np.ascontiguousarray(cost, dtype=np.float64)
    if work.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows, cols = lapjvr(work, return_cost=False)
    order = np.argsort(rows)
    return np.asarray(rows, dtype=np.int64)[order], np.asarray(cols, dtype=np.int64)[order]


def permutation_plan(columns: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The transport plan (..., n, n) of an assignment: 1/n where row i meets columns[i],
    with `like`'s dtype and device."""
    n = columns.shape[-1]
    plan = torch.zeros(*columns.shape, n, dtype=like.dtype, device=like.device)
    return plan.scatter_(-1, columns[..., None], 1.0 / max(n, 1))
