"""OT solvers with uniform marginals, POT-shaped: cost in, transport plan out.

Plans have the cost's shape (n_model, n_anchor), rows sum to 1/n_model and columns to
1/n_anchor, and live on the cost's device.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .assignment import assign, permutation_plan
from .errors import FusionError


def emd(cost: torch.Tensor) -> torch.Tensor:
    """Exact optimal plan(s) (hard alignment) for a cost (n, m) or a batch (..., n, m).

    With equal sizes and uniform marginals this is a linear assignment problem, solved
    exactly and batched by `assignment.assign` (about 0.3 s at 3072² on one core). Otherwise
    the network simplex runs without the iteration cap that makes POT's default return
    non-optimal plans.
    """
    *batch, n, m = cost.shape
    if n == m:
        return permutation_plan(assign(cost), cost)
    if batch:
        flat = cost.reshape(-1, n, m)
        return torch.stack([emd(c) for c in flat]).reshape(cost.shape)
    import ot  # POT only for non-square problems (importing it costs ~1 s of CPU)

    c = cost.detach().to("cpu", torch.float64).numpy()
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    plan, log = ot.emd(a, b, c, numItermax=max(10_000_000, 100 * n * m), log=True)
    if log.get("result_code") != 1:
        raise FusionError(f"exact OT did not converge on a {n}x{m} problem: {log.get('warning')}")
    return torch.from_numpy(plan).to(device=cost.device, dtype=cost.dtype)


def sinkhorn(
    cost: torch.Tensor, reg: float, tol: float = 1e-6, max_iter: int = 20_000
) -> torch.Tensor:
    """Entropic OT (soft alignment), stable for small regularizers (app. D.3).

    Runs the scaling iterations on a kernel whose large values are absorbed into log-domain
    potentials, and anneals the regularizer from the cost's scale down to `reg`, so tiny
    regularizers neither under- nor overflow and converge in few iterations. `cost` may
    carry leading batch dimensions (..., n, m): independent problems solved together.
    """
    if reg <= 0:
        raise ValueError("the Sinkhorn regularizer must be > 0")
    *batch, n, m = cost.shape
    small = cost.numel() <= 4_000_000
    work = torch.float64 if cost.device.type == "cpu" and small else torch.float32
    tiny = 1e-300 if work == torch.float64 else 1e-38
    c = cost.to(work)
    log_a, log_b = -math.log(n), -math.log(m)
    a, b = 1.0 / n, 1.0 / m
    f = torch.zeros(*batch, n, dtype=work, device=c.device)
    g = torch.zeros(*batch, m, dtype=work, device=c.device)
    # Annealing only where exp(-cost/eps) would underflow; each stage costs a full pass.
    start = max(float(c.amax()) / 32, reg)
    schedule = [start * 0.5**k for k in range(64) if start * 0.5**k > reg] + [reg]
    iterations = 0
    for stage, eps in enumerate(schedule):
        stage_tol = tol if stage == len(schedule) - 1 else max(tol, 1e-3)
        scaled = c / eps
        if stage == 0:  # eps >= max cost / 32: exp(-cost/eps) cannot underflow
            kernel = torch.exp(-scaled)
        else:  # exact log-domain half-steps put the potentials in range for this eps...
            f = eps * (log_a - torch.logsumexp(g[..., None, :] / eps - scaled, dim=-1))
            g = eps * (log_b - torch.logsumexp(f[..., :, None] / eps - scaled, dim=-2))
            kernel = torch.exp((f[..., :, None] + g[..., None, :]) / eps - scaled)
        kernel_t = kernel.transpose(-1, -2)
        u = torch.ones_like(f)
        v = torch.ones_like(g)
        while True:
            u = a / (kernel @ v[..., None])[..., 0].clamp_min(tiny)
            v = b / (kernel_t @ u[..., None])[..., 0].clamp_min(tiny)
            iterations += 1
            if iterations % 10 == 0 or iterations >= max_iter:
                row_mass = u * (kernel @ v[..., None])[..., 0]
                err = float((row_mass - a).abs().sum(-1).max())
                if not math.isfinite(err):
                    raise FusionError(f"Sinkhorn diverged at reg={reg:g} on a {n}x{m} problem")
                if err < stage_tol or iterations >= max_iter:
                    break
            # ...and large scalings are absorbed back into them, so nothing overflows.
            if float(torch.maximum(u.amax(), v.amax())) > 1e30:
                f, g = f + eps * torch.log(u), g + eps * torch.log(v)
                kernel = torch.exp((f[..., :, None] + g[..., None, :]) / eps - scaled)
                kernel_t = kernel.transpose(-1, -2)
                u, v = torch.ones_like(f), torch.ones_like(g)
        if iterations >= max_iter:
            break
    if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(v).all())):
        raise FusionError(f"Sinkhorn produced non-finite values at reg={reg:g}")
    return kernel.mul_(u[..., :, None]).mul_(v[..., None, :]).to(cost.dtype)


def solve(cost: torch.Tensor, solver: str, reg: float | None) -> torch.Tensor:
    """Plan(s) for a cost (n, m) or a batch of costs (..., n, m)."""
    if solver == "emd":
        return emd(cost)
    if solver == "sinkhorn":
        if reg is None:
            raise ValueError("Sinkhorn needs a regularizer")
        return sinkhorn(cost, reg)
    raise ValueError(f"unknown solver {solver!r}")
