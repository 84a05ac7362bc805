"""Lanczos with full reorthogonalisation: the thick-restart engine behind ``eigenvalues``.

With full reorthogonalisation (classical Gram-Schmidt, twice: "twice is enough") the basis stays
orthonormal to rounding, so no ghost copies of converged eigenvalues appear. After ``m`` steps
the basis is compressed to the best Ritz vectors and the residual direction (thick restart,
Wu & Simon 2000), which keeps the relation ``A V = V T + beta v e^T``, so that Ritz residual
norms ``|beta s_last|`` are known without extra products.

Layout and rounding (what makes it honest and fast at millions of parameters in float32):

- The basis ``V`` and the products ``W = A V`` are stored as contiguous rows, (m + 1, P): each
  basis vector handed to the operator is a contiguous (P, 1) view, and projections are BLAS
  matrix-vector products on contiguous memory.
- Inner products and norms are accumulated in float64 over chunks of the P entries
  (:func:`dots`). A float32 BLAS dot or ``vector_norm`` over 2M entries is off by up to 1e-3
  relative, which destroyed orthogonality and made ``|beta s_last|`` 60x too small.
- The products are kept, so the residual ``||A y - theta y||`` of a Ritz vector ``y = V s`` is
  computed explicitly as ``||W s - theta V s||`` (no extra products), whatever the state of the
  recurrence.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .._random import gaussian

#: Entries per chunk of the float64-accumulated inner products.
_CHUNK = 2**16


def dots(rows: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``rows @ vector`` for rows (r, P) and vector (P,), accumulated in float64 over chunks.

    Each chunk of ``_CHUNK`` entries is one BLAS product in the working dtype (rounding error
    ~ sqrt(chunk) eps instead of ~ sqrt(P) eps); the partial sums are added in float64.
    """
    size = vector.shape[0]
    if size <= _CHUNK or rows.dtype == torch.float64:
        return (rows @ vector).to(torch.float64)
    total = torch.zeros(rows.shape[0], dtype=torch.float64, device=vector.device)
    for start in range(0, size, _CHUNK):
        total += rows[:, start : start + _CHUNK] @ vector[start : start + _CHUNK]
    return total


def norm(vector: torch.Tensor) -> float:
    """The 2-norm of ``vector`` (P,), accumulated in float64."""
    return float(dots(vector[None, :], vector)[0].clamp_min(0).sqrt())


def orthogonalise(basis: torch.Tensor, vector: torch.Tensor) -> np.ndarray:
    """Remove from ``vector`` (P,), in place, its components along the orthonormal rows of
    ``basis`` (n, P).

    Two passes of classical Gram-Schmidt as matrix-vector products. Returns the float64
    coefficients.
    """
    total = np.zeros(basis.shape[0])
    for _ in range(2):
        coeffs = dots(basis, vector)
        vector.addmv_(basis.T, coeffs.to(vector.dtype), alpha=-1)
        total += coeffs.cpu().numpy()
    return total


class ThickRestartLanczos:
    """Single-vector thick-restart Lanczos on ``apply`` (a counted ``A @ block``).

    Args:
        apply: callable mapping a (P, 1) block to ``A @ block``.
        start: the starting vector (P,), nonzero.
        basis_size: the largest basis ``m`` (restart when reached); ``m < P``.
        generator: CPU generator, used only to continue after an invariant subspace is found.
    """

    def __init__(
        self,
        apply: Callable[[torch.Tensor], torch.Tensor],
        start: torch.Tensor,
        basis_size: int,
        generator: torch.Generator,
    ) -> None:
        size = start.shape[0]
        self.apply = apply
        self.generator = generator
        self.basis_size = basis_size
        # rows past the current basis are never read: empty, so untouched pages cost nothing
        self.V = torch.empty(basis_size + 1, size, dtype=start.dtype, device=start.device)
        self.W = torch.empty(basis_size, size, dtype=start.dtype, device=start.device)
        self.V[0] = start / norm(start)
        self.T = np.zeros((basis_size + 1, basis_size + 1))
        self.n = 0
        self.beta = 0.0
        self.eps = torch.finfo(start.dtype).eps

    def step(self) -> None:
        """One Lanczos step: multiply the newest basis vector, orthogonalise, extend the basis."""
        n = self.n
        self.W[n] = self.apply(self.V[n][:, None])[:, 0]
        vector = self.V[n + 1]
        vector.copy_(self.W[n])
        coeffs = orthogonalise(self.V[: n + 1], vector)
        self.T[n, n] = coeffs[n]
        beta = norm(vector)
        scale = math.sqrt(float(coeffs @ coeffs) + beta**2)  # ||A v_n||, by Pythagoras
        if beta <= 100 * self.eps * max(scale, 1e-300):
            vector.copy_(self._fresh_direction(n + 1))
            beta = 0.0
        else:
            vector /= beta
        self.T[n, n + 1] = self.T[n + 1, n] = beta
        self.beta = beta
        self.n = n + 1

    def _fresh_direction(self, count: int) -> torch.Tensor:
        """A random unit vector orthogonal to the first ``count`` basis vectors (after breakdown).

        The Krylov space is invariant; continuing from a new direction with a zero coupling keeps
        the Lanczos relation exact and lets the method find further (e.g. repeated) eigenvalues.
        """
        basis = self.V[:count]
        for _ in range(3):
            vector = gaussian(
                (basis.shape[1],), self.generator, dtype=basis.dtype, device=basis.device
            )
            orthogonalise(basis, vector)
            length = norm(vector)
            if length > 0:
                return vector / length
        return torch.zeros_like(vector)  # pragma: no cover - only if the basis spans everything

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), their vectors in the basis, and residual norms |beta s_last|."""
        n = self.n
        theta, vectors = np.linalg.eigh(self.T[:n, :n])
        return theta, vectors, np.abs(self.beta * vectors[n - 1, :])

    def ritz_vectors(self, vectors: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``(V s)^T`` and ``(W s)^T = (A V s)^T``, (len, P), for columns ``vectors`` (n, len).

        Both are linear combinations of stored rows: no products.
        """
        coeffs = torch.as_tensor(vectors.T, dtype=self.V.dtype).to(self.V.device)
        return coeffs @ self.V[: self.n], coeffs @ self.W[: self.n]

    def explicit(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """Rayleigh quotients, explicit residual norms ``||A y - value y||`` and unit rows ``y``.

        For the Ritz vectors ``y = V s / ||V s||`` with coefficient columns ``vectors``,
        computed from the stored products in float64-accumulated arithmetic, so they hold
        whatever rounding did to the recurrence.
        """
        rows, images = self.ritz_vectors(vectors)
        values, residuals = np.zeros(len(rows)), np.zeros(len(rows))
        for index in range(len(rows)):
            length = norm(rows[index])
            rows[index] /= length
            images[index] /= length
            values[index] = float(dots(rows[index][None, :], images[index])[0])
            residuals[index] = norm(images[index].add_(rows[index], alpha=-values[index]))
        return values, residuals, rows

    def restart(
        self, keep: np.ndarray, theta: np.ndarray, vectors: np.ndarray, lock: float
    ) -> None:
        """Compress the basis to the Ritz vectors ``keep`` plus the residual direction.

        Couplings ``beta s_last`` at most ``lock`` (rounding level) are set to zero: those pairs
        are locked, exact to rounding, and no longer change.
        """
        n, count = self.n, len(keep)
        kept, images = self.ritz_vectors(vectors[:, keep])
        self.V[:count] = kept
        self.W[:count] = images
        self.V[count] = self.V[n]
        couplings = self.beta * vectors[n - 1, keep]
        couplings[np.abs(couplings) <= lock] = 0.0
        self.T[:] = 0.0
        self.T[np.arange(count), np.arange(count)] = theta[keep]
        self.T[count, :count] = self.T[:count, count] = couplings
        self.n = count
