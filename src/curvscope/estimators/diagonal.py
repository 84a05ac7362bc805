"""Diagonal estimators: Hutchinson, XDiag, exact; with per-entry standard errors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_choice
from .._random import rademacher
from ..operators.base import split_by_shapes
from ._common import Counter, check_budget, check_operator, chunks, exact_diagonal, generator
from ._progress import Progress
from ._results import Result, estimate_status
from .trace import _leave_one_out_directions

METHODS = ("hutchinson", "xdiag", "exact")
_FUNC = "diagonal"
_MINIMUM = {"hutchinson": 2, "xdiag": 4}


@dataclass(frozen=True, eq=False)
class DiagonalEstimate(Result):
    """An estimate of diag(A), flat (P,), with per-entry standard errors.

    Index by parameter name (``est["layer.weight"]``, shaped like the parameter) or get all with
    ``est.by_name()`` when the operator had parameter names.

    Attributes:
        value: (P,) estimate of the diagonal, in the operator's dtype and device.
        std_error: (P,) per-entry standard errors (zeros for ``"exact"``).
        num_matvecs: products used.
        method: ``"hutchinson"``, ``"xdiag"`` or ``"exact"``.
        status: ``"exact"``, ``"estimated"`` (finite standard errors) or
            ``"no_error_estimate"`` (some standard error could not be estimated).
        param_shapes: name -> shape of the operator's parameters, or None.
    """

    value: torch.Tensor
    std_error: torch.Tensor
    num_matvecs: int
    method: str
    status: str
    param_shapes: dict[str, tuple[int, ...]] | None = None

    def by_name(self, *, std_error: bool = False) -> dict[str, torch.Tensor]:
        """The diagonal (or its standard error) split into a dict name -> tensor."""
        if not self.param_shapes:
            raise KeyError("this DiagonalEstimate has no parameter names (op had none)")
        return split_by_shapes(self.std_error if std_error else self.value, self.param_shapes)

    def __getitem__(self, name: str) -> torch.Tensor:
        parts = self.by_name()
        if name not in parts:
            raise KeyError(f"no parameter named {name!r}; names are {list(parts)}")
        return parts[name]


def _hutchinson(apply: Counter, op: Any, budget: int, gen: torch.Generator) -> tuple:
    """Mean and standard error of z * (A z) over Rademacher z (Bekas, Kokiopoulou & Saad 2007)."""
    size = op.shape[0]
    total = torch.zeros(size, dtype=torch.float64, device=op.device)
    squares = torch.zeros_like(total)
    for start, stop in chunks(budget):
        probes = rademacher((size, stop - start), gen, dtype=op.dtype, device=op.device)
        samples = (probes * apply(probes)).to(torch.float64)
        total += samples.sum(dim=1)
        squares += (samples**2).sum(dim=1)
    mean = total / budget
    variance = ((squares - budget * mean**2) / (budget - 1)).clamp_min(0)
    return mean, (variance / budget).sqrt()


def _xdiag(apply: Counter, op: Any, budget: int, gen: torch.Generator) -> tuple:
    """XDiag (Epperly, Tropp & Webber 2024): average over i of diag(Q_i Q_i^T A) plus the
    Hutchinson term w_i * ((I - Q_i Q_i^T) A w_i), where Q_i spans A W without column i.

    With A W = Q R, (I - Q_i Q_i^T) A w_i = (Q s_i)(s_i^T R e_i), so every term reuses A W, A Q.
    """
    count = budget // 2
    probes = rademacher((op.shape[0], count), gen, dtype=op.dtype, device=op.device)
    images = apply(probes)
    basis, factor = torch.linalg.qr(images)
    directions = _leave_one_out_directions(factor)
    basis_images = apply(basis)
    left, right = basis @ directions, basis_images @ directions
    weights = (directions * factor).sum(dim=0)
    shared = (basis * basis_images).sum(dim=1, keepdim=True)
    samples = (shared - left * right + probes * left * weights).to(torch.float64)
    std = samples.std(dim=1, unbiased=True)
    return samples.mean(dim=1), std / math.sqrt(count)


def diagonal(
    op: Any,
    *,
    method: str = "hutchinson",
    num_matvecs: int = 100,
    seed: int | torch.Generator = 0,
    progress: bool = False,
) -> DiagonalEstimate:
    """Estimate diag(A) from products with Rademacher probes, with per-entry standard errors.

    ``"hutchinson"``: diag(A) = E[z * A z] (Bekas, Kokiopoulou & Saad, 2007). ``"xdiag"``: the
    exchangeable low-rank-plus-Hutchinson estimator of Epperly, Tropp & Webber (SIAM J. Matrix
    Anal. Appl., 2024), far more accurate when the spectrum decays. ``"exact"``: e_i^T A e_i for
    every i (P products in blocks; ``num_matvecs`` is ignored).

    Args:
        op: a symmetric (P, P) operator.
        method: ``"hutchinson"`` (default), ``"xdiag"`` or ``"exact"``.
        num_matvecs: product budget: >= 2 for hutchinson, even and >= 4 for xdiag.
        seed: integer or ``torch.Generator`` for the probes.
        progress: show a progress bar on stderr.

    Returns:
        DiagonalEstimate with flat ``value`` (P,), ``std_error`` (P,), ``num_matvecs``, and
        per-parameter access ``est[name]`` / ``est.by_name()``.

    Example:
        >>> import torch, curvscope
        >>> op = curvscope.DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 6.0]]))
        >>> curvscope.diagonal(op, method="exact").value.tolist()
        [2.0, 6.0]
    """
    op = check_operator(op, _FUNC)
    method = check_choice(_FUNC, "method", method, METHODS)
    budget = check_budget(_FUNC, method, num_matvecs, _MINIMUM, even="xdiag")
    gen = generator(_FUNC, seed)
    apply = Counter(op)
    with Progress(progress, f"diagonal ({method})", budget or op.shape[0]) as bar:
        if method == "exact":
            value = exact_diagonal(apply, op)
            error = torch.zeros_like(value)
        else:
            value, error = {"hutchinson": _hutchinson, "xdiag": _xdiag}[method](
                apply, op, budget, gen
            )
        bar.update(apply.count, float(error.max()) if error.numel() else 0.0)
    shapes = getattr(op, "param_shapes", None)
    return DiagonalEstimate(
        value=value.to(op.dtype),
        std_error=error.to(op.dtype),
        num_matvecs=apply.count,
        method=method,
        status=estimate_status(method, error),
        param_shapes={n: tuple(s) for n, s in shapes.items()} if shapes else None,
    )
