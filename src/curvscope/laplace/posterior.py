"""Posterior precisions ``Λ = s·C + diag(δ)`` for each curvature structure.

``C`` is the curvature of ``loss_fn`` (as the operators give it), ``s`` the likelihood's scale
(see :mod:`curvscope.laplace.likelihood`) and ``δ`` a (P,) vector of prior precisions, constant
within a layer. Each structure answers the same questions exactly for its form of C: the
log-determinant, ``Λ⁻¹ M``, a square-root factor applied to noise (``S z`` with ``S Sᵀ = Λ⁻¹``),
and ``diag(Λ⁻¹)``; :class:`PosteriorPrecisionOperator` wraps Λ as a curvscope operator.

- :class:`DenseStructure`: C as a matrix; one eigendecomposition serves every scalar δ, a
  Cholesky factor every per-layer δ.
- :class:`DiagonalStructure`: C as its diagonal.
- :class:`LowRankStructure`: ``C ≈ U diag(λ) Uᵀ`` (top eigenpairs); Woodbury identities.
- :class:`StructuredStructure`: an operator with exact ``.logdet(damping)`` and
  ``.inverse(damping)`` (KFAC and the other structured operators), one per layer for
  per-layer priors; samples by Lanczos.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..operators.base import LinearOperator
from ._lanczos import lanczos_function

_NOT_PD = (
    "curvscope.LaplaceApproximation: the posterior precision s·C + δ·I is not positive definite "
    "(smallest eigenvalue {value:.3g}): the curvature has negative eigenvalues, as a Hessian "
    "away from a minimum can. Use the GGN (structure='full', 'diag', 'kfac' or 'lowrank') or "
    "a larger prior_precision."
)


def _is_scalar(prior: torch.Tensor) -> bool:
    return bool((prior == prior[0]).all())


class Structure:
    """One form of the curvature C (P, P); see the module docstring."""

    name = "operator"
    num_params: int

    def matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        """``C M`` for M (P, k)."""
        raise NotImplementedError

    def logdet(self, scale: float, prior: torch.Tensor) -> float:
        raise NotImplementedError

    def solve(self, scale: float, prior: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sqrt_inverse(self, scale: float, prior: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inverse_diagonal(self, scale: float, prior: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def diagonal(self) -> torch.Tensor:
        """diag(C), (P,)."""
        raise NotImplementedError

    def variance_of(self, rows: torch.Tensor) -> Callable[[float, torch.Tensor], torch.Tensor]:
        """For rows J (m, P): a function (s, δ) -> diag(J Λ⁻¹ Jᵀ) (m,), reusing work."""
        return lambda scale, prior: (rows * self.solve(scale, prior, rows.T).T).sum(dim=1)


class DenseStructure(Structure):
    """C as an explicit symmetric (P, P) matrix ("full"); ``psd=True`` clamps its eigenvalues
    at 0 (for a GGN, whose negative eigenvalues can only be rounding errors)."""

    name = "full"

    def __init__(self, matrix: torch.Tensor, *, psd: bool = False) -> None:
        self.num_params = matrix.shape[0]
        symmetric = ((matrix + matrix.T) / 2).to(torch.float64)
        values, vectors = torch.linalg.eigh(symmetric)
        if psd:  # a GGN: negative eigenvalues are rounding errors
            values = values.clamp_min(0)
            symmetric = (vectors * values) @ vectors.T
        self.matrix = symmetric.to(matrix.dtype)
        self._matrix64 = symmetric  # per-layer priors factor s·C + diag(δ) in float64
        self.values, self.vectors = values.to(matrix.dtype), vectors.to(matrix.dtype)
        self._cache: tuple[Any, torch.Tensor] | None = None
        self._squares: torch.Tensor | None = None

    def matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.matrix @ matrix

    def diagonal(self) -> torch.Tensor:
        return self.matrix.diagonal().clone()

    def variance_of(self, rows: torch.Tensor) -> Callable[[float, torch.Tensor], torch.Tensor]:
        projected = (rows @ self.vectors) ** 2  # one product, then any scalar δ is cheap

        def variance(scale: float, prior: torch.Tensor) -> torch.Tensor:
            if not _is_scalar(prior):
                return (rows * self.solve(scale, prior, rows.T).T).sum(dim=1)
            return projected @ (1.0 / self._spectrum(scale, prior))

        return variance

    def _spectrum(self, scale: float, prior: torch.Tensor) -> torch.Tensor:
        shifted = scale * self.values + prior[0]
        if shifted.numel() and float(shifted.min()) <= 0:
            raise ValueError(_NOT_PD.format(value=float(shifted.min())))
        return shifted

    def _cholesky(self, scale: float, prior: torch.Tensor) -> torch.Tensor:
        key = (scale, tuple(prior.tolist()))
        if self._cache is None or self._cache[0] != key:
            # float64: with s = N large, float32 round-off of s·C can exceed a small δ
            precision = scale * self._matrix64 + torch.diag(prior.to(torch.float64))
            factor, info = torch.linalg.cholesky_ex(precision)
            if int(info) != 0:
                raise ValueError(_NOT_PD.format(value=float(torch.linalg.eigvalsh(precision)[0])))
            self._cache = (key, factor)
        return self._cache[1]

    def logdet(self, scale: float, prior: torch.Tensor) -> float:
        if _is_scalar(prior):
            return float(self._spectrum(scale, prior).log().sum())
        return float(2 * self._cholesky(scale, prior).diagonal().log().sum())

    def solve(self, scale: float, prior: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        if _is_scalar(prior):
            q = self.vectors
            return q @ ((q.T @ matrix) / self._spectrum(scale, prior)[:, None])
        factor = self._cholesky(scale, prior)
        return torch.cholesky_solve(matrix.to(factor.dtype), factor).to(matrix.dtype)

    def sqrt_inverse(self, scale: float, prior: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if _is_scalar(prior):
            return self.vectors @ (noise / self._spectrum(scale, prior).sqrt()[:, None])
        factor = self._cholesky(scale, prior)  # Λ = L Lᵀ, L⁻ᵀ z has covariance Λ⁻¹
        out = torch.linalg.solve_triangular(factor.T, noise.to(factor.dtype), upper=True)
        return out.to(noise.dtype)

    def inverse_diagonal(self, scale: float, prior: torch.Tensor) -> torch.Tensor:
        if _is_scalar(prior):
            if self._squares is None:
                self._squares = self.vectors**2
            return self._squares @ (1.0 / self._spectrum(scale, prior))
        factor = self._cholesky(scale, prior)
        eye = torch.eye(self.num_params, dtype=factor.dtype, device=factor.device)
        inverse_factor = torch.linalg.solve_triangular(factor, eye, upper=False)
        return (inverse_factor**2).sum(dim=0).to(self.matrix.dtype)


class DiagonalStructure(Structure):
    """C as its diagonal (P,) ("diag")."""

    name = "diag"

    def __init__(self, diagonal: torch.Tensor, *, psd: bool = True) -> None:
        self.values = diagonal.clamp_min(0) if psd else diagonal
        self.num_params = diagonal.numel()

    def matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.values[:, None] * matrix

    def diagonal(self) -> torch.Tensor:
        return self.values.clone()

    def variance_of(self, rows: torch.Tensor) -> Callable[[float, torch.Tensor], torch.Tensor]:
        squared = rows**2
        return lambda scale, prior: squared @ (1.0 / self._precision(scale, prior))

    def _precision(self, scale: float, prior: torch.Tensor) -> torch.Tensor:
        precision = scale * self.values + prior
        if precision.numel() and float(precision.min()) <= 0:
            raise ValueError(_NOT_PD.format(value=float(precision.min())))
        return precision

    def logdet(self, scale: float, prior: torch.Tensor) -> float:
        return float(self._precision(scale, prior).log().sum())

    def solve(self, scale: float, prior: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        return matrix / self._precision(scale, prior)[:, None]

    def sqrt_inverse(self, scale: float, prior: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise / self._precision(scale, prior).sqrt()[:, None]

    def inverse_diagonal(self, scale: float, prior: torch.Tensor) -> torch.Tensor:
        return 1.0 / self._precision(scale, prior)


class LowRankStructure(Structure):
    """``C ≈ U diag(λ) Uᵀ`` with orthonormal U (P, r) and λ >= 0 ("lowrank").

    With ``D = diag(δ)`` and ``W = D^{-1/2} U (sλ)^{1/2}``: ``Λ = D^{1/2} (I + W Wᵀ) D^{1/2}``, so
    ``log det Λ = Σ log δ + log det(I_r + WᵀW)`` and every other answer follows from the r x r
    matrix ``I_r + WᵀW`` (Woodbury) or the thin SVD of W (the square root).
    """

    name = "lowrank"

    def __init__(self, vectors: torch.Tensor, values: torch.Tensor) -> None:
        self.vectors, self.values = vectors, values.clamp_min(0)
        self.num_params = vectors.shape[0]

    def matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.vectors @ (self.values[:, None] * (self.vectors.T @ matrix))

    def diagonal(self) -> torch.Tensor:
        return (self.vectors**2 * self.values).sum(dim=1)

    def _w(self, scale: float, prior: torch.Tensor) -> torch.Tensor:
        if float(prior.min()) <= 0:
            raise ValueError(_NOT_PD.format(value=float(prior.min())))
        return self.vectors * (scale * self.values).sqrt() / prior.sqrt()[:, None]

    def _core(self, w: torch.Tensor) -> torch.Tensor:
        return torch.linalg.cholesky(
            torch.eye(w.shape[1], dtype=w.dtype, device=w.device) + w.T @ w
        )

    def logdet(self, scale: float, prior: torch.Tensor) -> float:
        core = self._core(self._w(scale, prior))
        return float(prior.log().sum() + 2 * core.diagonal().log().sum())

    def solve(self, scale: float, prior: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        w, root = self._w(scale, prior), prior.sqrt()[:, None]
        scaled = matrix / root
        inner = scaled - w @ torch.cholesky_solve(w.T @ scaled, self._core(w))
        return inner / root

    def sqrt_inverse(self, scale: float, prior: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        w = self._w(scale, prior)
        basis, singular, _ = torch.linalg.svd(w, full_matrices=False)
        factor = (1 + singular**2).rsqrt() - 1
        return (noise + basis @ (factor[:, None] * (basis.T @ noise))) / prior.sqrt()[:, None]

    def inverse_diagonal(self, scale: float, prior: torch.Tensor) -> torch.Tensor:
        w = self._w(scale, prior)
        half = torch.linalg.solve_triangular(self._core(w), w.T, upper=False)  # L⁻¹ Wᵀ
        return (1 - (half**2).sum(dim=0)) / prior


class StructuredStructure(Structure):
    """An operator K with exact ``logdet(damping)`` and ``inverse(damping)`` (e.g. KFAC).

    ``log det(sK + δI) = P log s + K.logdet(δ/s)`` and ``(sK + δI)⁻¹ = K.inverse(δ/s) / s``.
    Per-layer priors use one operator per group of parameters (``blocks``: (slice, operator)),
    which must be the diagonal blocks of K (true of KFAC for groups that are whole modules).
    Samples ``Λ^{-1/2} z`` come from Lanczos on Λ's products.
    """

    name = "kfac"

    def __init__(
        self,
        operator: Any,
        *,
        blocks: Callable[[], Sequence[tuple[slice, Any]]] | None = None,
    ) -> None:
        self.operator, self._make_blocks = operator, blocks
        self._blocks: Sequence[tuple[slice, Any]] | None = None
        self.num_params = operator.shape[0]
        self.sampling_converged = True

    def matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.operator.matmat(matrix)

    def diagonal(self) -> torch.Tensor:
        diagonal = self.operator.diagonal()
        if isinstance(diagonal, dict):
            return torch.cat([diagonal[name].reshape(-1) for name in self.operator.param_names])
        return getattr(diagonal, "value", diagonal).reshape(-1)

    def _parts(self, prior: torch.Tensor) -> list[tuple[slice, Any, float]]:
        if _is_scalar(prior):
            return [(slice(0, self.num_params), self.operator, float(prior[0]))]
        if self._make_blocks is None:
            raise ValueError(
                "curvscope.LaplaceApproximation(prior_precision=...): per-layer prior precisions "
                "need the structure's diagonal blocks; this operator has none. Use a scalar "
                "prior_precision, or structure='kfac', 'full', 'diag' or 'lowrank'."
            )
        if self._blocks is None:
            self._blocks = list(self._make_blocks())
        return [(part, op, float(prior[part][0])) for part, op in self._blocks]

    def logdet(self, scale: float, prior: torch.Tensor) -> float:
        total = 0.0
        for part, op, delta in self._parts(prior):
            size = part.stop - part.start
            total += size * math.log(scale) + float(op.logdet(delta / scale))
        return total

    def solve(self, scale: float, prior: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(matrix)
        for part, op, delta in self._parts(prior):
            out[part] = op.inverse(delta / scale).matmat(matrix[part].contiguous()) / scale
        return out

    def variance_of(self, rows: torch.Tensor) -> Callable[[float, torch.Tensor], torch.Tensor]:
        """With an eigenbasis (KFAC, EKFAC), the rows are rotated once and every (s, δ) costs
        one product: ``diag(J Λ⁻¹ Jᵀ) = Σ_p (QᵀJᵀ)²_p / (s λ_p + δ_p)``, exact for priors
        constant on each Kronecker block (a scalar, or one δ per module)."""
        rotate = getattr(self.operator, "to_eigenbasis", None)
        if rotate is None:
            return super().variance_of(rows)
        squares = rotate(rows.T.contiguous()).square_()  # (P, m)
        values = self.operator.eigenbasis_values().to(squares.dtype)

        def variance(scale: float, prior: torch.Tensor) -> torch.Tensor:
            return torch.reciprocal(scale * values + prior.to(values.dtype)) @ squares

        return variance

    def sqrt_inverse(self, scale: float, prior: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(noise)
        for part, op, delta in self._parts(prior):

            def precision(matrix: torch.Tensor, op: Any = op, delta: float = delta) -> torch.Tensor:
                return scale * op.matmat(matrix) + delta * matrix

            result, ok = lanczos_function(precision, noise[part].contiguous(), torch.rsqrt)
            self.sampling_converged = self.sampling_converged and ok
            out[part] = result
        return out

    def inverse_diagonal(self, scale: float, prior: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.num_params, dtype=prior.dtype, device=prior.device)
        for part, op, delta in self._parts(prior):
            inverse = op.inverse(delta / scale)
            diagonal = inverse.diagonal() if hasattr(inverse, "diagonal") else None
            if isinstance(diagonal, dict):
                diagonal = torch.cat([diagonal[n].reshape(-1) for n in op.param_names])
            if diagonal is None:
                eye = torch.eye(part.stop - part.start, dtype=prior.dtype, device=prior.device)
                diagonal = inverse.matmat(eye).diagonal()
            out[part] = getattr(diagonal, "value", diagonal).reshape(-1) / scale
        return out


class PosteriorPrecisionOperator(LinearOperator):
    """The posterior precision ``Λ = s·C + diag(δ)`` as a curvscope operator (P, P).

    Besides the operator interface it has ``logdet()``, ``solve(matrix)`` (Λ⁻¹ M),
    ``inverse_diagonal()`` and ``to_dense()``; ``scale`` is s and ``prior`` the (P,) vector δ.
    """

    def __init__(
        self,
        structure: Structure,
        scale: float,
        prior: torch.Tensor,
        param_shapes: dict[str, torch.Size],
    ) -> None:
        self.structure, self.scale, self.prior = structure, scale, prior
        self._param_shapes = dict(param_shapes)
        self._dtype, self._device, self._num_matvecs = prior.dtype, prior.device, 0

    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.scale * self.structure.matmat(matrix) + self.prior[:, None] * matrix

    def logdet(self) -> float:
        """log det Λ, exact for the structure."""
        return self.structure.logdet(self.scale, self.prior)

    def solve(self, matrix: torch.Tensor) -> torch.Tensor:
        """Λ⁻¹ M for M (P, k)."""
        return self.structure.solve(self.scale, self.prior, matrix)

    def inverse_diagonal(self) -> torch.Tensor:
        """diag(Λ⁻¹), (P,): the posterior marginal variances."""
        return self.structure.inverse_diagonal(self.scale, self.prior)
