"""Exact assignment solvers side by side: is a GPU solver worth having? (issue 9)

    python bench/assignment.py [--device cpu|cuda] [--problems 12] [--n 3072] [--repeats 3]

Exact EMD of square problems is a linear assignment (`fusion_core/assignment.py`); otfuse
solves it with lapx's Jonker-Volgenant solver on the host's cores, even when the costs were
computed on a GPU. This script times that solver against scipy's and against a batched
auction written in torch (Bertsekas' forward auction with epsilon scaling, every free row
bidding at once), which runs wherever torch does, on the costs that make exact EMD slow:
BERT-base's MLP (3072 neurons, 2 x 768 features each), random init. A second cost set,
"near-permuted", models two trained models that already agree up to a permutation and noise.
Each row says whether the solver's assignments are optimal (cost within float64 rounding of
lapx's) and, for the auction, the duality gap its prices certify. Prints one table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from lap import lapjvr, lapjvr_batch
from scipy.optimize import linear_sum_assignment

from fusion_core.cost import pairwise_cost


def random_init_costs(problems: int, n: int, features: int, seed: int = 0) -> torch.Tensor:
    """Normalized distances between the neurons of two random-init layers, one per problem."""
    generator = torch.Generator().manual_seed(seed)
    costs = []
    for _ in range(problems):
        model = torch.randn(n, features, generator=generator) * 0.02
        anchor = torch.randn(n, features, generator=generator) * 0.02
        costs.append(pairwise_cost(model, anchor))
    return torch.stack(costs)


def near_permuted_costs(problems: int, n: int, features: int, seed: int = 0) -> torch.Tensor:
    """The model is a row-permuted anchor plus noise of a third of its scale."""
    generator = torch.Generator().manual_seed(seed)
    costs = []
    for _ in range(problems):
        anchor = torch.randn(n, features, generator=generator) * 0.02
        order = torch.randperm(n, generator=generator)
        noise = torch.randn(n, features, generator=generator) * 0.02 / 3
        costs.append(pairwise_cost(anchor[order] + noise, anchor))
    return torch.stack(costs)


@dataclass
class Solved:
    columns: torch.Tensor  # (problems, n): each row's column
    rounds: int = 0  # bidding rounds (auction only)
    gap: float | None = None  # largest relative duality gap the prices certify (auction)


def solve_lapx(costs: torch.Tensor) -> Solved:
    problems = costs.to(torch.float64).numpy()
    threads = min(torch.get_num_threads(), len(problems))
    rows_list, cols_list = lapjvr_batch(problems, return_cost=False, n_threads=threads)
    columns = np.empty(problems.shape[:2], dtype=np.int64)
    for k, (rows, cols) in enumerate(zip(rows_list, cols_list, strict=True)):
        columns[k, rows] = cols
    return Solved(torch.from_numpy(columns))


def solve_lapx_one_thread(costs: torch.Tensor) -> Solved:
    columns = np.empty(costs.shape[:2], dtype=np.int64)
    for k, cost in enumerate(costs.to(torch.float64).numpy()):
        rows, cols = lapjvr(cost, return_cost=False)
        columns[k, rows] = cols
    return Solved(torch.from_numpy(columns))


def solve_scipy(costs: torch.Tensor) -> Solved:
    columns = np.empty(costs.shape[:2], dtype=np.int64)
    for k, cost in enumerate(costs.to(torch.float64).numpy()):
        rows, cols = linear_sum_assignment(cost)
        columns[k, rows] = cols
    return Solved(torch.from_numpy(columns))


def auction(costs: torch.Tensor, final_eps: float = 1e-9, factor: float = 8.0) -> Solved:
    """Forward auction (minimizing cost) on all problems at once, on the costs' device.

    Each phase assigns every row afresh with bid increments of `eps` times the problem's cost
    span; prices carry over between phases. A phase ends with eps-complementary slackness, so
    the last phase's assignment is within n * eps of the optimum (exact once eps is below the
    gap between the two best assignments, which float costs do not bound).
    """
    costs = costs.to(torch.float64)
    batch, n, _ = costs.shape
    device = costs.device
    flat = costs.reshape(batch * n, n)
    span = (costs.amax(dim=(1, 2)) - costs.amin(dim=(1, 2))).clamp_min(1e-300)
    prices = torch.zeros(batch * n, dtype=torch.float64, device=device)
    scale = 0.25
    rounds = 0
    while True:
        eps = span * scale
        owner = torch.full((batch * n,), -1, dtype=torch.long, device=device)  # column -> row
        column_of = torch.full((batch * n,), -1, dtype=torch.long, device=device)  # row -> col
        while True:
            free = (column_of < 0).nonzero()[:, 0]  # flat row indices; one host sync a round
            if free.numel() == 0:
                break
            rounds += 1
            problem = free // n
            values = prices.view(batch, n)[problem].neg_().sub_(flat[free])  # -cost - price
            top = values.topk(2, dim=1)
            target = problem * n + top.indices[:, 0]  # flat column index
            bids = prices[target] + (top.values[:, 0] - top.values[:, 1]) + eps[problem]
            best = torch.full_like(prices, -torch.inf).scatter_reduce_(0, target, bids, "amax")
            wins = bids == best[target]
            winner = torch.full_like(owner, -1).scatter_reduce_(0, target[wins], free[wins], "amax")
            won = (winner >= 0).nonzero()[:, 0]
            outbid = owner[won]
            column_of[outbid[outbid >= 0]] = -1
            owner[won] = winner[won]
            column_of[winner[won]] = won
            prices[won] = best[won]
        if scale <= final_eps:
            break
        scale = max(scale / factor, final_eps)
    columns = (column_of.view(batch, n) - torch.arange(batch, device=device)[:, None] * n).cpu()
    # Duals: column potentials -price, row potentials the cheapest reduced cost of the row.
    reduced_min = (costs + prices.view(batch, 1, n)).amin(dim=2)
    dual = reduced_min.sum(1) - prices.view(batch, n).sum(1)
    primal = costs.gather(2, columns.to(device)[..., None]).sum((1, 2))
    gap = float(((primal - dual) / primal.abs().clamp_min(1e-300)).amax())
    return Solved(columns, rounds, gap)


def assignment_costs(costs: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    return costs.to(torch.float64).gather(2, columns[..., None]).sum((1, 2))


@dataclass
class Row:
    solver: str
    device: str
    seconds: list[float]
    per_problem: bool
    optimal: bool
    rounds: int
    gap: float | None


def timed(solve: Callable[[torch.Tensor], Solved], costs: torch.Tensor, repeats: int, sync):
    seconds, result = [], None
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        result = solve(costs)
        sync()
        seconds.append(time.perf_counter() - started)
    return seconds, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--problems", type=int, default=12)
    parser.add_argument("--n", type=int, default=3072)
    parser.add_argument("--features", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--costs", default="random-init,near-permuted")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    makers = {"random-init": random_init_costs, "near-permuted": near_permuted_costs}
    print(
        f"{args.problems} problems of {args.n}x{args.n}, {torch.get_num_threads()} host threads,"
        f" auction on {device}; median of {args.repeats} (scipy: first problem, once)"
    )
    header = f"{'costs':<14}{'solver':<22}{'device':<8}{'s (batch)':>11}{'s/problem':>11}"
    print(header + f"{'optimal':>9}{'rounds':>8}{'dual gap':>10}")
    for name in args.costs.split(","):
        costs = makers[name](args.problems, args.n, args.features)
        reference = solve_lapx(costs)
        best = assignment_costs(costs, reference.columns)
        tolerance = 1e-12 * args.n * best.abs().clamp_min(1.0)

        def optimal(solved: Solved, count: int, costs=costs, best=best, tolerance=tolerance):
            got = assignment_costs(costs[:count], solved.columns)
            return bool(((got - best[:count]).abs() <= tolerance[:count]).all())

        rows = []
        host_solvers = (
            ("lapx JV, threads", solve_lapx),
            ("lapx JV, 1 thread", solve_lapx_one_thread),
        )
        for label, solve in host_solvers:
            seconds, solved = timed(solve, costs, args.repeats, lambda: None)
            rows.append(Row(label, "cpu", seconds, False, optimal(solved, args.problems), 0, None))
        seconds, solved = timed(solve_scipy, costs[:1], 1, lambda: None)
        rows.append(Row("scipy", "cpu", seconds, True, optimal(solved, 1), 0, None))
        on_device = costs.to(device)
        auction(on_device[:1, :64, :64])  # warm-up (kernels, allocator)
        seconds, solved = timed(auction, on_device, args.repeats, sync)
        rows.append(
            Row(
                "torch auction",
                device.type,
                seconds,
                False,
                optimal(solved, args.problems),
                solved.rounds,
                solved.gap,
            )
        )
        for row in rows:
            median = statistics.median(row.seconds)
            batch_s = median * (args.problems if row.per_problem else 1)
            per = median if row.per_problem else median / args.problems
            gap = f"{row.gap:.1e}" if row.gap is not None else "-"
            rounds = str(row.rounds) if row.rounds else "-"
            mark = "*" if row.per_problem else " "
            print(
                f"{name:<14}{row.solver:<22}{row.device:<8}{batch_s:>10.2f}{mark}{per:>11.3f}"
                f"{'yes' if row.optimal else 'NO':>9}{rounds:>8}{gap:>10}"
            )
    print("* scipy's batch time is its first problem's times the number of problems")


if __name__ == "__main__":
    main()
