import itertools

import numpy as np
import ot
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from fusion_core import assignment
from fusion_core.assignment import AUCTION_MIN_N, assign, auction_assign, auction_suits
from fusion_core.cost import pairwise_cost
from fusion_core.errors import FusionError
from fusion_core.heads import HeadSet, head_matched_plans, output_plan
from fusion_core.solvers import emd, sinkhorn, solve
from fusion_core.transport import (
    GatheredMap,
    HeadBlockMap,
    SparseMap,
    apply_on_axis,
    as_permutation,
    in_map,
    in_scaled,
    merge_plans,
    out_map,
    out_scaled,
    permutation_distance,
)


def planted_cost(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A cost with a unique optimal permutation, well separated from the rest."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    cost = 0.5 + 0.5 * torch.rand(n, n, generator=gen)
    cost[torch.arange(n), perm] = 0.3 * torch.rand(n, generator=gen)
    return cost / cost.max(), perm


def test_emd_finds_the_planted_permutation():
    cost, perm = planted_cost(64)
    plan = emd(cost)
    assert torch.equal(plan.argmax(1), perm)
    torch.testing.assert_close(plan.sum(0), torch.full((64,), 1 / 64))


def test_emd_is_optimal_where_capped_network_simplex_is_not_needed():
    """Equal sizes: linear assignment; its cost equals POT's exact EMD cost."""
    gen = torch.Generator().manual_seed(1)
    cost = torch.rand(40, 40, generator=gen, dtype=torch.float64)
    a = np.full(40, 1 / 40)
    reference = ot.emd2(a, a, cost.numpy(), numItermax=10_000_000)
    assert float((emd(cost) * cost).sum()) == pytest.approx(reference, rel=1e-9)


def square_costs(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """Square costs of one kind, in float64 (the tests cast them)."""
    if kind == "uniform":
        return torch.rand(n, n, generator=gen, dtype=torch.float64)
    if kind == "near-uniform":  # random-init layers: distances concentrate near the max
        return 0.9 + 0.01 * torch.randn(n, n, generator=gen, dtype=torch.float64)
    if kind == "integers-with-ties":
        return torch.randint(0, 4, (n, n), generator=gen).double()
    if kind == "constant":
        return torch.full((n, n), 0.7, dtype=torch.float64)
    if kind == "negative-and-wide":
        return torch.randn(n, n, generator=gen, dtype=torch.float64) * 1e3
    if kind == "rank-one":  # c_ij = x_i y_j: many near-ties
        x, y = torch.rand(2, n, 1, generator=gen, dtype=torch.float64)
        return x @ y.T
    x, y = torch.randn(2, n, 8, generator=gen, dtype=torch.float64)  # euclidean
    return torch.cdist(x, y)


def assert_is_permutation_plan(plan: torch.Tensor) -> torch.Tensor:
    """The plan is 1/n on a permutation and 0 elsewhere; returns the column of each row."""
    n = plan.shape[0]
    columns = plan.argmax(1)
    assert sorted(columns.tolist()) == list(range(n))
    expected = torch.zeros_like(plan)
    expected[torch.arange(n), columns] = 1 / n
    assert torch.equal(plan, expected)
    return columns


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kind",
    [
        "uniform",
        "near-uniform",
        "integers-with-ties",
        "constant",
        "negative-and-wide",
        "rank-one",
        "euclidean",
    ],
)
def test_square_emd_is_an_optimal_assignment(kind, dtype):
    """Every plan is a permutation with uniform marginals whose cost equals the optimum that
    scipy's linear_sum_assignment finds on the same (cast) values."""
    gen = torch.Generator().manual_seed(sum(map(ord, kind)))
    for n in [1, 2, 3, 5, 8, 13, 31, 64, 100, 257]:
        cost = square_costs(kind, n, gen).to(dtype)
        plan = emd(cost)
        assert plan.dtype == dtype and plan.shape == (n, n)
        columns = assert_is_permutation_plan(plan)
        values = cost.double().numpy()
        rows, optimal = linear_sum_assignment(values)
        best = values[rows, optimal].sum()
        assert values[np.arange(n), columns.numpy()].sum() == pytest.approx(
            best, rel=1e-12, abs=1e-12
        ), f"{kind} {n}x{n}"


def test_square_emd_batches_equal_the_problems_one_by_one():
    gen = torch.Generator().manual_seed(11)
    costs = torch.rand(2, 3, 20, 20, generator=gen)  # continuous: one optimum each
    batched = emd(costs)
    assert batched.shape == costs.shape
    for cost, plan in zip(costs.reshape(-1, 20, 20), batched.reshape(-1, 20, 20), strict=True):
        assert torch.equal(plan, emd(cost))
    assert torch.equal(solve(costs, "emd", None), batched)


def test_square_emd_rejects_non_finite_costs():
    cost = torch.rand(4, 4)
    cost[1, 2] = float("nan")
    with pytest.raises(FusionError, match="non-finite"):
        emd(cost)
    cost[1, 2] = float("inf")
    with pytest.raises(FusionError, match="non-finite"):
        emd(cost)


def test_rectangular_emd_keeps_both_marginals_and_is_optimal():
    gen = torch.Generator().manual_seed(2)
    cost = torch.rand(48, 32, generator=gen, dtype=torch.float64)
    plan = emd(cost)
    torch.testing.assert_close(plan.sum(1), torch.full((48,), 1 / 48, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(0), torch.full((32,), 1 / 32, dtype=torch.float64))
    reference = ot.emd2(np.full(48, 1 / 48), np.full(32, 1 / 32), cost.numpy(), numItermax=10**7)
    assert float((plan * cost).sum()) == pytest.approx(reference, rel=1e-9)


def test_sinkhorn_approaches_emd_as_the_regularizer_goes_to_zero():
    cost, _ = planted_cost(50, seed=3)
    exact = emd(cost)
    distances = [
        float((sinkhorn(cost, reg) - exact).abs().sum()) for reg in (0.3, 0.1, 0.03, 0.01, 0.003)
    ]
    assert all(b < a for a, b in itertools.pairwise(distances))
    assert distances[-1] < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reg", [1.0, 0.01, 0.003, 0.0005])
def test_sinkhorn_is_stable_at_small_regularizers(dtype, reg):
    gen = torch.Generator().manual_seed(4)
    cost = torch.rand(300, 200, generator=gen).to(dtype)
    plan = sinkhorn(cost, reg)
    assert plan.dtype == dtype and bool(torch.isfinite(plan).all())
    torch.testing.assert_close(
        plan.sum(0), torch.full((200,), 1 / 200, dtype=dtype), atol=1e-6, rtol=1e-3
    )
    torch.testing.assert_close(
        plan.sum(1), torch.full((300,), 1 / 300, dtype=dtype), atol=1e-6, rtol=1e-3
    )


def test_sinkhorn_matches_pot_at_moderate_regularization():
    gen = torch.Generator().manual_seed(5)
    cost = torch.rand(30, 30, generator=gen, dtype=torch.float64)
    a = np.full(30, 1 / 30)
    reference = ot.sinkhorn(a, a, cost.numpy(), 0.1, stopThr=1e-12, numItermax=100_000)
    np.testing.assert_allclose(sinkhorn(cost, 0.1, tol=1e-12).numpy(), reference, atol=1e-9)


def test_sinkhorn_rejects_a_non_positive_regularizer():
    with pytest.raises(ValueError):
        sinkhorn(torch.rand(3, 3), 0.0)


def test_plans_stay_on_the_cost_device():
    cost = torch.rand(8, 8)
    assert emd(cost).device == cost.device and sinkhorn(cost, 0.1).device == cost.device


@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
def test_a_batch_of_problems_equals_the_problems_one_by_one(solver):
    gen = torch.Generator().manual_seed(6)
    costs = torch.rand(4, 12, 9, generator=gen, dtype=torch.float64)
    batched = solve(costs, solver, 0.05)
    for cost, plan in zip(costs, batched, strict=True):
        # both stop at the solver tolerance (1e-6 on the marginals), not at the same iterate
        torch.testing.assert_close(plan, solve(cost, solver, 0.05), atol=1e-6, rtol=1e-4)


def test_permutation_plans_are_applied_by_gathering():
    plan = emd(planted_cost(16, seed=7)[0])
    index = as_permutation(plan)
    assert index is not None and as_permutation(sinkhorn(planted_cost(16)[0], 0.1)) is None
    weights = torch.randn(5, 16, 3)
    torch.testing.assert_close(
        apply_on_axis(weights, 1, index), apply_on_axis(weights, 1, out_map(plan))
    )


def test_sparse_exact_plans_are_applied_by_gathers_equal_to_the_products():
    """Merged permutations (the residual policy's average of two hard plans) and network
    simplex plans between different widths have a few sources per anchor neuron: both roles
    are applied by gathers, with the normalizations and scales of the dense maps."""
    first, second = emd(planted_cost(24, seed=1)[0]), emd(planted_cost(24, seed=2)[0])
    rectangular = emd(torch.rand(30, 24, generator=torch.Generator().manual_seed(3)))
    weights = torch.randn(4, 30, 30)
    scale = torch.rand(24) + 0.5
    for plan in (merge_plans(first, second, 0.3), rectangular):
        n = plan.shape[0]
        for scaled, dense in ((out_scaled(plan), out_map(plan)), (in_scaled(plan), in_map(plan))):
            scaled = scaled.then(scale)
            gathered = GatheredMap.of(scaled)
            assert gathered is not None and gathered.index.shape[0] <= 4
            torch.testing.assert_close(
                apply_on_axis(weights[:, :n], 1, gathered),
                apply_on_axis(weights[:, :n], 1, dense * scale),
            )
    assert GatheredMap.of(out_scaled(sinkhorn(planted_cost(24)[0], 0.1))) is None


def test_exact_plans_with_many_sources_are_applied_by_sparse_products_equal_to_dense():
    """The residual stream's exact plan after many merges has more sources per anchor
    neuron than gathers pay for, yet few: a sparse product, equal to the dense one."""
    plan = emd(planted_cost(96, seed=0)[0])
    for seed in range(1, 10):  # ten layers' permutations averaged in turn
        plan = merge_plans(plan, emd(planted_cost(96, seed=seed)[0]), 0.6)
    weights = torch.randn(5, 96, 7)
    scale = torch.rand(96) + 0.5
    for scaled, dense in ((out_scaled(plan), out_map(plan)), (in_scaled(plan), in_map(plan))):
        scaled = scaled.then(scale)
        assert GatheredMap.of(scaled) is None
        sparse = SparseMap.of(scaled, density=1 / 8)
        assert sparse is not None
        for axis, tensor in ((1, weights), (0, weights[0]), (0, weights[0, :, 0])):
            torch.testing.assert_close(
                apply_on_axis(tensor, axis, sparse), apply_on_axis(tensor, axis, dense * scale)
            )
    assert SparseMap.of(out_scaled(sinkhorn(planted_cost(96)[0], 0.1))) is None


@pytest.mark.parametrize("d_model", [8, 6])
def test_head_matched_soft_plans_are_applied_per_head_equal_to_the_products(d_model):
    """Sinkhorn plans of head-matched spaces (queries, grouped keys/values, what the output
    projection reads, and heads of different widths) are applied as one small block per
    anchor head: the same map as the dense plan, with its normalizations and scales."""
    gen = torch.Generator().manual_seed(5)
    heads, groups, d_anchor = 4, 2, 8
    sets = [
        HeadSet(("q",), torch.randn(heads * d_model, 10, generator=gen), torch.randn(32, 10)),
        HeadSet(("v",), torch.randn(groups * d_model, 7, generator=gen), torch.randn(16, 7)),
    ]
    sets[1].per_group = True
    result = head_matched_plans(sets, heads, groups, "sinkhorn", 0.05)
    query, value = result.plans
    reads = output_plan(value, result.query_pairs, heads, groups)
    weights = torch.randn(3, heads * d_model, 5, generator=gen)
    scale = torch.rand(heads * d_anchor, generator=gen) + 0.5
    for plan, count in ((query, heads), (value, groups), (reads, heads)):
        n = plan.shape[0]
        for scaled, dense in ((out_scaled(plan), out_map(plan)), (in_scaled(plan), in_map(plan))):
            scaled = scaled.then(scale[: plan.shape[1]])
            blocks = HeadBlockMap.of(scaled, count)
            assert blocks is not None and blocks.blocks.shape[0] == count
            torch.testing.assert_close(
                apply_on_axis(weights[:, :n], 1, blocks),
                apply_on_axis(weights[:, :n], 1, dense * scale[: plan.shape[1]]),
            )
            torch.testing.assert_close(
                apply_on_axis(weights[0, :n, 0], 0, blocks),
                apply_on_axis(weights[0, :n, 0], 0, dense * scale[: plan.shape[1]]),
            )
    # a plan that moves mass between heads (the cross-head pool) stays dense
    assert HeadBlockMap.of(out_scaled(sinkhorn(planted_cost(32)[0], 0.1)), heads) is None


@pytest.mark.parametrize(
    "plan",
    [
        torch.tensor([[0.5, 0.5], [0.0, 0.0]]),  # n nonzeros, two in one row
        torch.tensor([[0.5, 0.0], [0.5, 0.0]]),  # n nonzeros, two in one column
        torch.tensor([[-0.5, 0.0], [0.0, 0.5]]),  # a negative entry is no mass
        torch.tensor([[0.25, 0.25], [0.25, 0.25]]),  # soft
        torch.full((2, 3), 1 / 6),  # rectangular
    ],
)
def test_only_permutation_plans_are_gathered(plan):
    assert as_permutation(plan) is None


def test_permutation_distance_is_the_mean_column_share_of_the_largest_entry():
    soft = sinkhorn(planted_cost(12, seed=8)[0], 0.1)
    expected = 1 - out_map(soft).max(0).values.mean()
    assert permutation_distance(soft) == pytest.approx(float(expected), rel=1e-6)
    assert permutation_distance(emd(planted_cost(12, seed=8)[0])) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "kind",
    ["uniform", "near-uniform", "integers-with-ties", "constant", "rank-one", "euclidean"],
)
def test_auction_is_an_optimal_assignment(kind, dtype):
    """The integer auction (exact EMD on a GPU) reaches scipy's optimum on the same cast
    values, exactly (no tolerance), for batches of problems of every size."""
    gen = torch.Generator().manual_seed(sum(map(ord, kind)))
    for n in [1, 2, 3, 5, 8, 13, 31, 64, 129]:
        costs = torch.stack([square_costs(kind, n, gen) for _ in range(3)]).to(dtype)
        costs[1] *= 64  # problems of different spans in one batch
        columns = auction_assign(costs)
        assert columns is not None, f"{kind} {n}x{n}: declined"
        assert columns.shape == (3, n) and columns.dtype == torch.long
        for cost, found in zip(costs, columns, strict=True):
            assert sorted(found.tolist()) == list(range(n))
            values = cost.double().numpy()
            rows, optimal = linear_sum_assignment(values)
            best = values[rows, optimal].sum()
            assert values[np.arange(n), found.numpy()].sum() == best, f"{kind} {n}x{n}"


@pytest.mark.parametrize("magnitude", [1e-30, 1e-3, 1e9, 1e30])
def test_auction_is_exact_at_any_magnitude(magnitude):
    """The integer form scales by powers of two in float64, whatever the costs' exponents."""
    costs = (1 + torch.rand(2, 40, 40, generator=torch.Generator().manual_seed(4))) * magnitude
    columns = auction_assign(costs)
    for cost, found in zip(costs.double().numpy(), columns.numpy(), strict=True):
        rows, optimal = linear_sum_assignment(cost)
        assert cost[np.arange(40), found].sum() == cost[rows, optimal].sum()


def test_auction_matches_jv_on_random_init_neuron_costs():
    """The costs that make exact EMD slow: distances between random-init neurons, nearly
    equal everywhere; and a near-permuted pair, like two trained models that agree."""
    gen = torch.Generator().manual_seed(5)
    model, anchor = torch.randn(2, 384, 96, generator=gen) * 0.02
    order = torch.randperm(384, generator=gen)
    noise = torch.randn(384, 96, generator=gen) * 0.005
    costs = torch.stack(
        [pairwise_cost(model, anchor), pairwise_cost(anchor[order] + noise, anchor)]
    )
    found = auction_assign(costs)
    expected = assign(costs)
    values = costs.double()
    for k in range(2):
        rows = torch.arange(384)
        assert float(values[k, rows, found[k]].sum()) == float(values[k, rows, expected[k]].sum())
    assert torch.equal(found[1], expected[1]) and torch.equal(found[1], order)


def test_auction_declines_what_it_cannot_solve_exactly_and_assign_falls_back(monkeypatch):
    """float64 costs, costs spanning too many binary orders for int64, and a spent round
    budget give None; `assign` then solves the problem with JV."""
    gen = torch.Generator().manual_seed(2)
    cost = torch.rand(1, 40, 40, generator=gen)
    assert auction_assign(cost.double()) is None
    wide = cost.clone()
    wide[0, 3, 7] = 1e-20
    assert auction_assign(wide) is None
    assert auction_assign(cost, max_rounds=1) is None
    with pytest.raises(ValueError, match="square"):
        auction_assign(torch.rand(1, 3, 4))
    monkeypatch.setattr(assignment, "auction_suits", lambda device, n: True)
    for problem in (cost.double(), wide):
        values = problem[0].double().numpy()
        rows, optimal = linear_sum_assignment(values)
        got = assign(problem)[0].numpy()
        assert values[np.arange(40), got].sum() == pytest.approx(values[rows, optimal].sum())


def test_assign_gives_the_auction_costs_it_can_represent(monkeypatch):
    """Random-init neuron costs lie within [min, 2 min] of each row, where JV's row offsets
    apply; where a row's two cheapest entries are an ulp apart, the offsets leave a
    difference of one ulp, too fine a granule for int64 beside the largest costs. So the
    auction must get the costs before the offsets, and solve them."""
    gen = torch.Generator().manual_seed(6)
    model, anchor = torch.randn(2, 1024, 128, generator=gen) * 0.02
    cost = pairwise_cost(model, anchor)
    cheapest, at = cost.min(1)
    some = torch.arange(0, 1024, 128)
    cost[some, (at[some] + 1) % 1024] = torch.nextafter(cheapest[some], torch.tensor(2.0))
    low, high = cost.aminmax(dim=1)
    assert bool((high <= 2 * low).all())  # the rows JV would offset
    assert assignment.integer_costs((cost - low[:, None])[None]) is None
    solved = []
    auction = assignment.auction_assign

    def spied(costs, *args, **kwargs):
        columns = auction(costs, *args, **kwargs)
        solved.append(columns is not None)
        return columns

    monkeypatch.setattr(assignment, "auction_suits", lambda device, n: True)
    monkeypatch.setattr(assignment, "auction_assign", spied)
    found = assign(cost)
    assert solved == [True]
    monkeypatch.setattr(assignment, "auction_suits", lambda device, n: False)
    expected = assign(cost)
    rows = torch.arange(1024)
    values = cost.double()
    assert float(values[rows, found].sum()) == float(values[rows, expected].sum())


def test_assign_tries_the_auction_on_gpus_for_large_problems_only():
    assert auction_suits(torch.device("cuda", 0), AUCTION_MIN_N)
    assert not auction_suits(torch.device("cuda", 0), AUCTION_MIN_N - 1)
    assert not auction_suits(torch.device("cpu"), 10 * AUCTION_MIN_N)
