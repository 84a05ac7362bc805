"""Conjugate gradients for one Hessian-free step: warm start, iterate snapshots, Martens' stop.

CG minimises the damped quadratic model ``φ(x) = ½ xᵀ(C + λI)x + gᵀx`` (Martens, 2010, "Deep
learning via Hessian-free optimization", section 4). Unlike ``curvscope.solve`` it starts from a
given point (the previous step's direction, decayed), keeps the iterates at geometrically
spaced iterations for backtracking, and stops on the relative progress of ``φ`` rather than on
the residual (optionally also on the residual, as Newton-CG does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Iterates are kept at iterations ceil(_SPACING^j) (and the last one).
_SPACING = 1.3


@dataclass(frozen=True)
class Iterate:
    """A CG iterate ``x`` after ``iteration`` products, with its model value ``φ(x)``."""

    iteration: int
    x: torch.Tensor
    phi: float


@dataclass(frozen=True)
class CGRun:
    """What one CG run left: the kept iterates (ascending), products used, why it stopped."""

    iterates: list[Iterate]
    num_matvecs: int
    status: str  # "progress", "converged", "max_iters" or "negative_curvature"


def _snapshots(max_iters: int) -> set[int]:
    """Iterations at which to keep the iterate: ceil(1.3^j), j = 0, 1, ..."""
    kept, power = set(), 1.0
    while power <= max_iters:
        kept.add(math.ceil(power))
        power *= _SPACING
    return kept


def _phi(x: torch.Tensor, gradient: torch.Tensor, residual: torch.Tensor) -> float:
    """``φ(x) = ½ xᵀ(g - r)`` from the residual ``r = -g - (C + λI)x`` (no product)."""
    return 0.5 * float(torch.dot(x, gradient - residual))


def _start(
    apply: Callable[[torch.Tensor], torch.Tensor],
    gradient: torch.Tensor,
    damping: float,
    x0: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(x, r, products)``: the warm start if it beats ``x = 0`` on ``φ``, else zero."""
    zero = torch.zeros_like(gradient)
    if x0 is None or not bool(torch.any(x0 != 0)):
        return zero, -gradient, 0
    residual = -gradient - apply(x0) - damping * x0
    if _phi(x0, gradient, residual) < 0:
        return x0.clone(), residual, 1
    return zero, -gradient, 1


def _stalled(phis: list[float], tol: float) -> bool:
    """Martens' rule: ``(φ_i - φ_{i-k}) / φ_i < k ε`` with ``k = max(10, ⌈0.1 i⌉)``."""
    i = len(phis) - 1
    k = max(10, math.ceil(0.1 * i))
    if i <= k or phis[i] >= 0:
        return False
    return (phis[i] - phis[i - k]) / phis[i] < k * tol


def damped_cg(
    apply: Callable[[torch.Tensor], torch.Tensor],
    gradient: torch.Tensor,
    damping: float,
    *,
    x0: torch.Tensor | None,
    max_iters: int,
    tol: float,
    forcing: bool = False,
) -> CGRun:
    """Minimise ``½ xᵀ(C + λI)x + gᵀx`` by CG from ``x0`` (see the module docstring).

    Args:
        apply: ``v -> C v`` for a flat vector (one product).
        gradient: g, flat (P,).
        damping: λ >= 0.
        x0: warm start (P,), or None for zero; replaced by zero if ``φ(x0) >= 0``.
        max_iters: at most this many CG iterations.
        tol: Martens' ε for the relative-progress stop.
        forcing: also stop once ``‖r‖ <= min(0.5, √‖g‖) ‖g‖`` (the forcing sequence of
            Newton-CG, Nocedal & Wright, Algorithm 7.1: superlinear local convergence).

    Returns:
        CGRun with the iterates kept at geometric spacing (and the last), ascending.
    """
    x, residual, products = _start(apply, gradient, damping, x0)
    keep, kept = _snapshots(max_iters), []
    phis = [_phi(x, gradient, residual)]
    direction, rr = residual.clone(), float(torch.dot(residual, residual))
    gnorm = float(torch.linalg.vector_norm(gradient))
    floor = (torch.finfo(gradient.dtype).eps * gnorm) ** 2
    if forcing:
        floor = max(floor, (min(0.5, math.sqrt(gnorm)) * gnorm) ** 2)
    status = "max_iters"
    for iteration in range(1, max_iters + 1):
        if rr <= floor:
            status = "converged"
            break
        product = apply(direction) + damping * direction
        products += 1
        curvature = float(torch.dot(direction, product))
        if curvature <= 0:
            status = "negative_curvature"
            if iteration == 1 and not bool(torch.any(x != 0)):  # a steepest-descent step instead
                scale = max(damping, abs(curvature) / max(rr, 1e-300), 1e-12)
                x = residual / scale
                phis.append(0.5 * curvature / scale**2 + float(torch.dot(gradient, x)))
            break
        alpha = rr / curvature
        x = x + alpha * direction
        residual = residual - alpha * product
        phis.append(_phi(x, gradient, residual))
        if iteration in keep:
            kept.append(Iterate(iteration, x, phis[-1]))
        new_rr = float(torch.dot(residual, residual))
        direction = residual + (new_rr / rr) * direction
        rr = new_rr
        if _stalled(phis, tol):
            status = "progress"
            break
    if (not kept or kept[-1].x is not x) and bool(torch.any(x != 0)):
        kept.append(Iterate(max(len(phis) - 1, 1), x, phis[-1]))
    return CGRun(kept, products, status)
