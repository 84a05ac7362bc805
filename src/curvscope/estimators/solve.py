"""Solves (A + damping I) x = b by conjugate gradients, with an honest status."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_float, check_int
from ._common import Counter, check_operator, check_tensor_for, check_tol
from ._lanczos import dots, norm
from ._progress import Progress
from ._results import Result

_FUNC = "solve"


@dataclass(frozen=True, eq=False)
class SolveResult(Result):
    """The solution of (A + damping I) x = b and how well it solves it.

    Attributes:
        x: the solution, (P,) (or a dict name -> tensor if b was a dict).
        residual_norm: ||b - (A + damping I) x||, recomputed with one product at the end.
        relative_residual: residual_norm / ||b||.
        converged: ``relative_residual <= tol``.
        num_matvecs: products used.
        num_iterations: CG iterations.
        status: ``"converged"``, ``"max_matvecs"`` (budget spent), ``"not positive definite"``
            (a direction p with p^T (A + damping I) p <= 0 was met; x is the last iterate) or
            ``"stagnated"`` (the recurrence converged but the recomputed residual did not).
    """

    x: Any
    residual_norm: float
    relative_residual: float
    converged: bool
    num_matvecs: int
    num_iterations: int
    status: str
    damping: float
    tol: float


def _dot(left: torch.Tensor, right: torch.Tensor) -> float:
    """``left @ right`` accumulated in float64 (a float32 BLAS dot over millions is off)."""
    return float(dots(left[None, :], right)[0])


def _cg(apply, rhs, damping, tol, budget, bar) -> tuple[torch.Tensor, int, str]:
    """Conjugate gradients from x = 0 (Hestenes & Stiefel 1952), in float64 scalars."""
    x = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    rho = _dot(residual, residual)
    target = (tol * norm(rhs)) ** 2
    iterations, status = 0, "max_matvecs"
    while rho > target:
        if apply.count >= budget:
            return x, iterations, "max_matvecs"
        image = apply(direction[:, None])[:, 0] + damping * direction
        curvature = _dot(direction, image)
        if not curvature > 0:
            return x, iterations, "not positive definite"
        step = rho / curvature
        x = x + step * direction
        residual = residual - step * image
        rho, previous = _dot(residual, residual), rho
        direction = residual + (rho / previous) * direction
        iterations += 1
        bar.update(apply.count, rho**0.5)
    status = "converged"
    return x, iterations, status


def solve(
    op: Any,
    b: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    progress: bool = False,
) -> SolveResult:
    """Solve (A + damping I) x = b by conjugate gradients; failure is reported, never raised.

    CG (Hestenes & Stiefel 1952) minimises the A-norm error over growing Krylov spaces; it needs
    A + damping I positive definite, and stops with status ``"not positive definite"`` as soon as
    a direction with p^T (A + damping I) p <= 0 shows that it is not.

    Args:
        op: a symmetric (P, P) operator.
        b: right-hand side, (P,) on the operator's dtype and device, or a dict name -> tensor.
        damping: lambda >= 0 added to the diagonal.
        tol: stop when ||b - (A + damping I) x|| <= tol ||b||.
        max_matvecs: product budget; default min(10 P, 1000) (plus one to check the residual).
        progress: show a progress bar (products, residual norm) on stderr.

    Returns:
        SolveResult with ``x``, ``residual_norm``, ``converged``, ``num_matvecs``, ``status``.

    Example:
        >>> import torch, curvscope
        >>> op = curvscope.DenseOperator(torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
        >>> curvscope.solve(op, torch.tensor([2.0, 2.0])).x.tolist()
        [1.0, 0.5]
    """
    op = check_operator(op, _FUNC)
    as_dict = isinstance(b, Mapping) and hasattr(op, "flatten_dict")
    rhs = op.flatten_dict(b, func=_FUNC, arg="b") if as_dict else b
    rhs = check_tensor_for(_FUNC, "b", rhs, op)
    damping = check_float(_FUNC, "damping", damping, minimum=0.0)
    tol = check_tol(_FUNC, tol)
    budget = check_int(_FUNC, "max_matvecs", max_matvecs, minimum=1, allow_none=True)
    budget = min(10 * op.shape[0], 1000) if budget is None else budget
    apply = Counter(op)
    with Progress(progress, "solve", budget) as bar:
        x, iterations, status = _cg(apply, rhs, damping, tol, budget, bar)
    norm_b = norm(rhs)
    true_residual = rhs - (apply(x[:, None])[:, 0] + damping * x) if iterations else rhs
    residual_norm = norm(true_residual)
    relative = residual_norm / norm_b if norm_b > 0 else 0.0
    converged = relative <= tol
    if status == "converged" and not converged:
        status = "stagnated"
    return SolveResult(
        x=op.unflatten(x) if as_dict else x,
        residual_norm=residual_norm,
        relative_residual=relative,
        converged=converged,
        num_matvecs=apply.count,
        num_iterations=iterations,
        status=status,
        damping=damping,
        tol=tol,
    )
