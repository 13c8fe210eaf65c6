"""Exact assignment solvers side by side: JV on the host against the auction on a device.

    python bench/assignment.py [--device cpu|cuda] [--problems 12] [--n 3072]
        [--features 1536] [--repeats 3] [--seed 0] [--eps-schedule 2,3] [--no-scipy]

Exact EMD of square problems is a linear assignment (`fusion_core/assignment.py`). otfuse
solves it with lapx's Jonker-Volgenant solver on the host's threads, and on a GPU, for
problems of `AUCTION_MIN_N` neurons and more, with its integer auction where the costs are.
This script times both (and scipy, on the first problem) on the costs that make exact EMD
slow: distances between random-init neurons (default: BERT-base's twelve 3072-wide MLPs,
2 x 768 features each; `--problems 1 --n 8192 --features 4096` is Llama-3.2-1B's MLP). A
second cost set, "near-permuted", models two trained models that already agree up to a
permutation and noise. Each row says whether the solver's assignments are optimal (the
same total cost as JV's, exactly) and, for the auction, its bidding rounds. Prints one
table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fusion_core import assignment
from fusion_core.assignment import assign
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


def solve_jv(costs: torch.Tensor) -> Solved:
    """What otfuse runs on the host: one batch on torch's threads."""
    return Solved(assign(costs))


def solve_jv_one_thread(costs: torch.Tensor) -> Solved:
    return Solved(torch.stack([assign(cost) for cost in costs]))


def solve_scipy(costs: torch.Tensor) -> Solved:
    columns = np.empty(costs.shape[:2], dtype=np.int64)
    for k, cost in enumerate(costs.to(torch.float64).numpy()):
        rows, cols = linear_sum_assignment(cost)
        columns[k, rows] = cols
    return Solved(torch.from_numpy(columns))


def solve_auction(costs: torch.Tensor) -> Solved:
    """otfuse's integer auction on the costs' device, its rounds counted."""
    rounds = [0]
    bids = assignment._bids

    def counted(*args):
        rounds[0] += 1
        return bids(*args)

    assignment._bids = counted
    try:
        columns = assignment.auction_assign(costs)
    finally:
        assignment._bids = bids
    if columns is None:
        raise RuntimeError("the auction declined these costs (see auction_assign)")
    return Solved(columns.cpu(), rounds[0])


def assignment_costs(costs: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    return costs.to(torch.float64).gather(2, columns[..., None]).sum((1, 2))


@dataclass
class Row:
    solver: str
    device: str
    seconds: list[float]
    solved: Solved
    per_problem: bool = False  # timed on the first problem only


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
    parser.add_argument("--seed", type=int, default=0, help="of the random costs")
    parser.add_argument(
        "--eps-schedule",
        help="FIRST,STEP: the auction's first eps is span / 2^FIRST, divided by 2^STEP a phase"
        f" (default {assignment._FIRST_SHIFT},{assignment._SHIFT_STEP})",
    )
    parser.add_argument(
        "--no-scipy", action="store_true", help="skip scipy (25 s on one 8192 problem)"
    )
    args = parser.parse_args()
    if args.eps_schedule:  # what docs/benchmarks.md compares schedules with
        first, step = (int(v) for v in args.eps_schedule.split(","))
        assignment._FIRST_SHIFT, assignment._SHIFT_STEP = first, step
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    makers = {"random-init": random_init_costs, "near-permuted": near_permuted_costs}
    print(
        f"{args.problems} problems of {args.n}x{args.n}, {torch.get_num_threads()} host threads,"
        f" auction on {device}; median of {args.repeats} (scipy: first problem, once)"
    )
    print(
        f"{'costs':<14}{'solver':<26}{'device':<8}{'s (batch)':>11}{'s/problem':>11}"
        f"{'optimal':>9}{'rounds':>8}"
    )
    for name in args.costs.split(","):
        costs = makers[name](args.problems, args.n, args.features, args.seed)
        rows = []
        for label, solve in (
            ("JV (lapx), threads", solve_jv),
            ("JV, 1 thread", solve_jv_one_thread),
        ):
            rows.append(Row(label, "cpu", *timed(solve, costs, args.repeats, lambda: None)))
        if not args.no_scipy:
            seconds, solved = timed(solve_scipy, costs[:1], 1, lambda: None)
            rows.append(Row("scipy", "cpu", seconds, solved, per_problem=True))
        on_device = costs.to(device)
        solve_auction(on_device[:1, :64, :64])  # warm-up (kernels, allocator)
        rows.append(
            Row(
                "integer auction", device.type, *timed(solve_auction, on_device, args.repeats, sync)
            )
        )
        best = assignment_costs(costs, rows[0].solved.columns)
        for row in rows:
            count = len(row.solved.columns)
            got = assignment_costs(costs[:count], row.solved.columns)
            optimal = bool(torch.equal(got, best[:count]))
            median = statistics.median(row.seconds)
            batch_s = median * (args.problems if row.per_problem else 1)
            per = median if row.per_problem else median / args.problems
            rounds = f"{row.solved.rounds:,}" if row.solved.rounds else "-"
            mark = "*" if row.per_problem else " "
            print(
                f"{name:<14}{row.solver:<26}{row.device:<8}{batch_s:>10.2f}{mark}{per:>11.3f}"
                f"{'yes' if optimal else 'NO':>9}{rounds:>8}"
            )
    print("* scipy's batch time is its first problem's times the number of problems")
    print("optimal: the same total cost as JV's on every problem (JV's rows: by construction)")


if __name__ == "__main__":
    main()
