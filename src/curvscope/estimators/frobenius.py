"""The Frobenius norm by Hutchinson on ||A||_F^2 = E||A z||^2, with its standard error."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_int
from .._random import rademacher
from ._common import (
    Counter,
    check_confidence,
    check_operator,
    chunks,
    generator,
    mean_and_error,
    quantile,
)
from ._progress import Progress
from ._results import Result, estimate_status

_FUNC = "frobenius_norm"


@dataclass(frozen=True, eq=False)
class FrobeniusNormEstimate(Result):
    """An estimate of ||A||_F with its standard error and confidence interval.

    Attributes:
        value: sqrt of the mean of ||A z||^2.
        std_error: delta-method standard error of the norm, se(||A||_F^2) / (2 value).
        ci_low, ci_high: square roots of the t interval for ||A||_F^2 (clipped at 0).
        confidence: the interval's nominal coverage.
        num_matvecs: products used.
        status: ``"estimated"`` (finite standard error) or ``"no_error_estimate"``.
    """

    value: float
    std_error: float
    ci_low: float
    ci_high: float
    confidence: float
    num_matvecs: int
    status: str


def frobenius_norm(
    op: Any,
    *,
    num_matvecs: int = 100,
    confidence: float = 0.95,
    seed: int | torch.Generator = 0,
    progress: bool = False,
) -> FrobeniusNormEstimate:
    """Estimate ||A||_F from ||A||_F^2 = tr(A^T A) = E[||A z||^2] over Rademacher z (Hutchinson).

    Args:
        op: a (P, P) operator.
        num_matvecs: number of probes (products), >= 2.
        confidence: nominal coverage of ``[ci_low, ci_high]``, in (0, 1).
        seed: integer or ``torch.Generator`` for the probes.
        progress: show a progress bar (products, relative standard error) on stderr.

    Returns:
        FrobeniusNormEstimate with ``value``, ``std_error``, ``ci_low``, ``ci_high``.

    Example:
        >>> import torch, curvscope
        >>> op = curvscope.DenseOperator(torch.eye(4, dtype=torch.float64))
        >>> curvscope.frobenius_norm(op, num_matvecs=10).value
        2.0
    """
    op = check_operator(op, _FUNC, symmetric=False)
    budget = check_int(_FUNC, "num_matvecs", num_matvecs, minimum=2)
    confidence = check_confidence(_FUNC, confidence)
    gen = generator(_FUNC, seed)
    apply, samples = Counter(op), []
    with Progress(progress, "frobenius norm", budget) as bar:
        for start, stop in chunks(budget):
            shape = (op.shape[0], stop - start)
            probes = rademacher(shape, gen, dtype=op.dtype, device=op.device)
            samples.append((apply(probes).to(torch.float64) ** 2).sum(dim=0))
            bar.update(apply.count)
    square, square_error = mean_and_error(torch.cat(samples))
    value = math.sqrt(max(square, 0.0))
    half = quantile(confidence, budget - 1) * square_error
    return FrobeniusNormEstimate(
        value=value,
        std_error=square_error / (2 * value) if value > 0 else 0.0,
        ci_low=math.sqrt(max(square - half, 0.0)),
        ci_high=math.sqrt(max(square + half, 0.0)),
        confidence=confidence,
        num_matvecs=apply.count,
        status=estimate_status("hutchinson", square_error),
    )
