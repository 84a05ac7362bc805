"""Shared helpers of the estimators: operator validation, counted products, probes, quantiles."""

from __future__ import annotations

import math
from typing import Any

import scipy.stats
import torch

from .._checks import (
    check_dtype_and_device,
    check_float,
    check_generator_or_seed,
    check_int,
    type_error,
    value_error,
)
from .._random import make_generator
from ..operators.base import as_operator

#: Columns per product in chunked estimators (exact trace/diagonal, probe blocks).
CHUNK = 64


class Counter:
    """Counts the columns passed to ``op.matmat`` (our own ``num_matvecs``)."""

    def __init__(self, op: Any) -> None:
        self.op = op
        self.count = 0

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        """``A @ block`` for ``block`` of shape (P, k); counts k products."""
        if block.shape[1] == 0:
            return block.clone()
        self.count += block.shape[1]
        return self.op.matmat(block)


def check_operator(op: Any, func: str, *, symmetric: bool = True) -> Any:
    """Validate ``op`` (any object with the operator interface) and check its symmetry flag."""
    op = as_operator(op, func)
    if symmetric and getattr(op, "is_symmetric", True) is False:
        raise value_error(
            func,
            "op",
            "a symmetric operator (is_symmetric True)",
            op,
            "This estimator relies on A = A^T; symmetrise the operator first.",
        )
    if not getattr(op.dtype, "is_floating_point", False):
        raise type_error(func, "op", "an operator with a floating-point dtype", op.dtype)
    return op


def generator(func: str, seed: Any) -> torch.Generator:
    """A CPU generator from ``seed`` (an integer or a ``torch.Generator``), validated."""
    check_generator_or_seed(func, "seed", seed)
    return make_generator(seed)


def check_confidence(func: str, confidence: Any) -> float:
    """``confidence`` must lie in the open interval (0, 1)."""
    return check_float(func, "confidence", confidence, minimum=0.0, maximum=1.0, open_interval=True)


def check_tol(func: str, tol: Any) -> float:
    """``tol`` must be a positive number."""
    return check_float(func, "tol", tol, minimum=0.0, open_interval=True)


def check_tensor_for(
    func: str, arg: str, value: Any, op: Any, *, allow_block: bool = False
) -> torch.Tensor:
    """Check that ``value`` is a (P,) (or, if allowed, (P, m)) tensor on op's dtype and device."""
    size = op.shape[0]
    expected = f"a tensor of shape ({size},)" + (f" or ({size}, m)" if allow_block else "")
    if not isinstance(value, torch.Tensor):
        raise type_error(func, arg, expected, value)
    ok_ndim = value.ndim == 1 or (allow_block and value.ndim == 2 and value.shape[1] >= 1)
    if not ok_ndim or value.shape[0] != size:
        raise value_error(func, arg, expected, value, "Flatten it in the order of op.param_names.")
    check_dtype_and_device(func, arg, value, op.dtype, op.device)
    return value


def quantile(confidence: float, dof: int | None = None) -> float:
    """Two-sided critical value: Student's t with ``dof`` degrees of freedom, normal if None."""
    level = 0.5 + confidence / 2
    if dof is None or dof <= 0:
        return float(scipy.stats.norm.ppf(level))
    return float(scipy.stats.t.ppf(level, dof))


def mean_and_error(samples: torch.Tensor) -> tuple[float, float]:
    """Sample mean and its standard error (inf with fewer than two samples), in float64."""
    samples = samples.detach().to(device="cpu", dtype=torch.float64)
    count = samples.numel()
    mean = float(samples.mean())
    if count < 2:
        return mean, math.inf
    return mean, float(samples.std(unbiased=True)) / math.sqrt(count)


def chunks(total: int, size: int = CHUNK) -> list[tuple[int, int]]:
    """Split ``range(total)`` into (start, stop) pairs of at most ``size``."""
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def exact_diagonal(apply: Counter, op: Any) -> torch.Tensor:
    """diag(A) exactly, from products with blocks of the P unit vectors (P products)."""
    size = op.shape[0]
    value = torch.zeros(size, dtype=op.dtype, device=op.device)
    for start, stop in chunks(size):
        eye = torch.zeros(size, stop - start, dtype=op.dtype, device=op.device)
        eye[torch.arange(start, stop), torch.arange(stop - start)] = 1
        value[start:stop] = apply(eye)[start:stop].diagonal()
    return value


def check_budget(
    func: str, method: str, num_matvecs: Any, minimum: dict[str, int], even: str | None
) -> int:
    """Validate ``num_matvecs`` for ``method``: >= ``minimum[method]`` (even for ``even``).

    The "exact" method takes None or any positive integer (it always uses P products).
    """
    if method == "exact":
        return check_int(func, "num_matvecs", num_matvecs, minimum=1, allow_none=True) or 0
    least = minimum[method]
    budget = check_int(func, "num_matvecs", num_matvecs)
    if budget < least or (method == even and budget % 2):
        parity = " and even" if method == even else ""
        raise value_error(
            func,
            "num_matvecs",
            f"an integer >= {least}{parity} for {method}",
            budget,
            f"Pass num_matvecs={max(least, budget + budget % 2)} or more.",
        )
    return budget
