"""What every structured operator (KFAC, EKFAC, GGN diagonal, block diagonal) shares: an exact
``inverse(damping)``, ``logdet(damping)``, ``trace()`` and ``diagonal()`` from its structure, and
the small operator that an inverse returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .._checks import check_float
from .base import LinearOperator, split_by_shapes


class FunctionOperator(LinearOperator):
    """A symmetric operator given by a function on (P, k) blocks (e.g. an exact inverse).

    Args:
        matmat: ``V (P, k) -> A V (P, k)``.
        param_shapes: the ordered parameter shapes (their numels add up to P).
        dtype: the dtype of the vectors.
        device: the device of the vectors.
        name: a short description, shown in ``repr``.
    """

    def __init__(
        self,
        matmat: Callable[[torch.Tensor], torch.Tensor],
        param_shapes: dict[str, torch.Size],
        dtype: torch.dtype,
        device: torch.device,
        name: str,
    ) -> None:
        self._function, self._name = matmat, name
        self._param_shapes = dict(param_shapes)
        self._dtype, self._device, self._num_matvecs = dtype, device, 0

    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        return self._function(matrix)

    def __repr__(self) -> str:
        return f"{self._name}(shape={self.shape}, dtype={self.dtype})"


def check_damping(func: str, damping: float) -> float:
    """Damping λ must be a finite number >= 0."""
    value = check_float(func, "damping", damping, minimum=0.0)
    if not math.isfinite(value):
        check_float(func, "damping", damping, minimum=0.0, maximum=1e308)
    return value


def inverse_spectrum(func: str, spectrum: torch.Tensor, damping: float) -> torch.Tensor:
    """``1 / (spectrum + damping)``, refusing a singular (or indefinite-to-zero) matrix."""
    shifted = spectrum + damping
    if shifted.numel() and bool((shifted == 0).any()):
        raise ValueError(
            f"curvscope.{func}(damping=...): K + {damping} I is singular (it has a zero "
            "eigenvalue), so it has no inverse. Pass damping > 0."
        )
    return 1.0 / shifted


def log_spectrum(func: str, spectrum: torch.Tensor, damping: float) -> float:
    """``Σ log(spectrum + damping)``: -inf for a singular, an error for an indefinite matrix."""
    shifted = spectrum + damping
    if shifted.numel() and bool((shifted < 0).any()):
        lowest = float(shifted.min())
        raise ValueError(
            f"curvscope.{func}(damping=...): K + {damping} I has a negative eigenvalue "
            f"({lowest:.4g}), so its log-determinant is not real. Pass damping > "
            f"{-float(spectrum.min()):.4g}."
        )
    return float(torch.log(shifted).sum())


class StructuredOperator(LinearOperator):
    """Base of operators with an exact inverse, log-determinant, trace and diagonal.

    Subclasses implement ``_inverse_matmat(V, damping)``, ``_spectrum()`` (all eigenvalues, any
    order, as one 1-D tensor), ``_diagonal_flat()`` and may override ``trace``.
    """

    def _inverse_matmat(self, matrix: torch.Tensor, damping: float) -> torch.Tensor:
        raise NotImplementedError

    def _spectrum(self) -> torch.Tensor:
        raise NotImplementedError

    def _diagonal_flat(self) -> torch.Tensor:
        raise NotImplementedError

    def inverse(self, damping: float = 0.0) -> LinearOperator:
        """The operator ``(K + λI)⁻¹`` with λ = ``damping`` >= 0, applied exactly.

        Raises ValueError when ``K + λI`` is singular (pass ``damping > 0``).
        """
        func = f"{type(self).__name__}.inverse"
        damping = check_damping(func, damping)
        inverse_spectrum(func, self._spectrum(), damping)  # refuse singular matrices up front
        return FunctionOperator(
            lambda matrix: self._inverse_matmat(matrix, damping),
            self._param_shapes,
            self.dtype,
            self.device,
            f"{type(self).__name__}.inverse(damping={damping})",
        )

    def logdet(self, damping: float = 0.0) -> float:
        """``log det(K + λI)``, exact for the structure (-inf if singular)."""
        func = f"{type(self).__name__}.logdet"
        return log_spectrum(func, self._spectrum(), check_damping(func, damping))

    def trace(self) -> float:
        """``tr K``, exact."""
        return float(self._spectrum().sum())

    def diagonal(self) -> dict[str, torch.Tensor]:
        """The diagonal of K as a dict parameter name -> tensor shaped like the parameter."""
        return split_by_shapes(self._diagonal_flat(), self._param_shapes)
