"""OT solvers with uniform marginals, POT-shaped: cost in, transport plan out.

Plans have the cost's shape (n_model, n_anchor), rows sum to 1/n_model and columns to
1/n_anchor, and live on the cost's device.
"""

from __future__ import annotations

import math

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment

from .errors import FusionError


def emd(cost: torch.Tensor) -> torch.Tensor:
    """Exact optimal plan (hard alignment).

    With equal sizes and uniform marginals this is a linear assignment problem, solved
    exactly by scipy's shortest augmenting path in seconds at 3072². Otherwise the network
    simplex runs without the iteration cap that makes POT's default return non-optimal plans.
    """
    n, m = cost.shape
    c = cost.detach().to("cpu", torch.float64).numpy()
    if n == m:
        rows, cols = linear_sum_assignment(c)
        plan = np.zeros((n, m))
        plan[rows, cols] = 1.0 / n
    else:
        a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
        plan, log = ot.emd(a, b, c, numItermax=max(10_000_000, 100 * n * m), log=True)
        if log.get("result_code") != 1:
            raise FusionError(
                f"exact OT did not converge on a {n}x{m} problem: {log.get('warning')}"
            )
    return torch.from_numpy(plan).to(device=cost.device, dtype=cost.dtype)


def sinkhorn(
    cost: torch.Tensor, reg: float, tol: float = 1e-6, max_iter: int = 20_000
) -> torch.Tensor:
    """Entropic OT (soft alignment), stable for small regularizers (app. D.3).

    Runs the scaling iterations on a kernel whose large values are absorbed into log-domain
    potentials, and anneals the regularizer from the cost's scale down to `reg`, so tiny
    regularizers neither under- nor overflow and converge in few iterations.
    """
    if reg <= 0:
        raise ValueError("the Sinkhorn regularizer must be > 0")
    n, m = cost.shape
    work = torch.float64 if cost.device.type == "cpu" and n * m <= 4_000_000 else torch.float32
    c = cost.to(work)
    log_a, log_b = -math.log(n), -math.log(m)
    f = torch.zeros(n, dtype=work, device=c.device)
    g = torch.zeros(m, dtype=work, device=c.device)
    # Annealing only where exp(-cost/eps) would underflow; each stage costs a full pass.
    start = max(float(c.max()) / 32, reg)
    schedule = [start * 0.5**k for k in range(64) if start * 0.5**k > reg] + [reg]
    iterations = 0
    for stage, eps in enumerate(schedule):
        final = stage == len(schedule) - 1
        # Exact log-domain half-steps put the potentials in range for this eps...
        scaled = c / eps
        f = eps * (log_a - torch.logsumexp(g[None, :] / eps - scaled, dim=1))
        g = eps * (log_b - torch.logsumexp(f[:, None] / eps - scaled, dim=0))
        kernel = torch.exp((f[:, None] + g[None, :]) / eps - scaled)
        u = torch.ones(n, dtype=work, device=c.device)
        v = torch.ones(m, dtype=work, device=c.device)
        a, b = math.exp(log_a), math.exp(log_b)
        stage_tol = tol if final else max(tol, 1e-3)
        while True:
            u = a / (kernel @ v).clamp_min(1e-300 if work == torch.float64 else 1e-38)
            v = b / (kernel.T @ u).clamp_min(1e-300 if work == torch.float64 else 1e-38)
            iterations += 1
            if iterations % 10 == 0 or iterations >= max_iter:
                err = float((u * (kernel @ v) - a).abs().sum())
                if not math.isfinite(err):
                    raise FusionError(f"Sinkhorn diverged at reg={reg:g} on a {n}x{m} problem")
                if err < stage_tol or iterations >= max_iter:
                    break
            # ...and large scalings are absorbed back into them, so nothing overflows.
            if float(u.abs().max()) > 1e30 or float(v.abs().max()) > 1e30:
                f, g = f + eps * torch.log(u), g + eps * torch.log(v)
                kernel = torch.exp((f[:, None] + g[None, :]) / eps - scaled)
                u.fill_(1.0)
                v.fill_(1.0)
        if iterations >= max_iter:
            break
    plan = u[:, None] * kernel * v[None, :]
    if not bool(torch.isfinite(plan).all()):
        raise FusionError(f"Sinkhorn produced non-finite values at reg={reg:g}")
    return plan.to(cost.dtype)


def solve(cost: torch.Tensor, solver: str, reg: float | None) -> torch.Tensor:
    if solver == "emd":
        return emd(cost)
    if solver == "sinkhorn":
        if reg is None:
            raise ValueError("Sinkhorn needs a regularizer")
        return sinkhorn(cost, reg)
    raise ValueError(f"unknown solver {solver!r}")
