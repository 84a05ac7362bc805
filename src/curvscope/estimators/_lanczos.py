"""Lanczos with full reorthogonalisation: the thick-restart engine behind ``eigenvalues``.

With full reorthogonalisation (classical Gram-Schmidt, twice: "twice is enough") the basis stays
orthonormal to rounding, so no ghost copies of converged eigenvalues appear. After ``m`` steps
the basis is compressed to the best Ritz vectors and the residual direction (thick restart,
Wu & Simon 2000), which keeps the relation ``A V = V T + beta v e^T`` exact, so that Ritz
residual norms ``||A y - theta y|| = |beta s_last|`` are known without extra products.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .._random import gaussian


def orthogonalise(basis: torch.Tensor, vector: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Remove from ``vector`` (P,) its components along the orthonormal columns of ``basis``.

    Two passes of classical Gram-Schmidt. Returns the new vector and the float64 coefficients.
    """
    total = np.zeros(basis.shape[1])
    for _ in range(2):
        coeffs = basis.T @ vector
        vector = vector - basis @ coeffs
        total += coeffs.detach().to("cpu", torch.float64).numpy()
    return vector, total


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
        self.V = torch.zeros(size, basis_size + 1, dtype=start.dtype, device=start.device)
        self.V[:, 0] = start / torch.linalg.vector_norm(start)
        self.T = np.zeros((basis_size + 1, basis_size + 1))
        self.n = 0
        self.beta = 0.0
        self.eps = torch.finfo(start.dtype).eps

    def step(self) -> None:
        """One Lanczos step: multiply the newest basis vector, orthogonalise, extend the basis."""
        n = self.n
        product = self.apply(self.V[:, n : n + 1])[:, 0]
        scale = float(torch.linalg.vector_norm(product))
        vector, coeffs = orthogonalise(self.V[:, : n + 1], product)
        self.T[n, n] = coeffs[n]
        beta = float(torch.linalg.vector_norm(vector))
        if beta <= 100 * self.eps * max(scale, 1e-300):
            vector, beta = self._fresh_direction(n + 1), 0.0
        else:
            vector = vector / beta
        self.V[:, n + 1] = vector
        self.T[n, n + 1] = self.T[n + 1, n] = beta
        self.beta = beta
        self.n = n + 1

    def _fresh_direction(self, count: int) -> torch.Tensor:
        """A random unit vector orthogonal to the first ``count`` basis vectors (after breakdown).

        The Krylov space is invariant; continuing from a new direction with a zero coupling keeps
        the Lanczos relation exact and lets the method find further (e.g. repeated) eigenvalues.
        """
        basis = self.V[:, :count]
        for _ in range(3):
            vector = gaussian(
                (basis.shape[0],), self.generator, dtype=basis.dtype, device=basis.device
            )
            vector, _ = orthogonalise(basis, vector)
            norm = float(torch.linalg.vector_norm(vector))
            if norm > 0:
                return vector / norm
        return torch.zeros_like(vector)  # pragma: no cover - only if the basis spans everything

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), their vectors in the basis, and residual norms |beta s_last|."""
        n = self.n
        theta, vectors = np.linalg.eigh(self.T[:n, :n])
        return theta, vectors, np.abs(self.beta * vectors[n - 1, :])

    def ritz_vectors(self, vectors: np.ndarray) -> torch.Tensor:
        """The Ritz vectors ``V s`` (P, len) for coefficient columns ``vectors`` (n, len)."""
        coeffs = torch.as_tensor(vectors, dtype=self.V.dtype).to(self.V.device)
        return self.V[:, : self.n] @ coeffs

    def restart(
        self, keep: np.ndarray, theta: np.ndarray, vectors: np.ndarray, lock: float
    ) -> None:
        """Compress the basis to the Ritz vectors ``keep`` plus the residual direction.

        Couplings ``beta s_last`` at most ``lock`` (rounding level) are set to zero: those pairs
        are locked, exact to rounding, and no longer change.
        """
        n, count = self.n, len(keep)
        kept = self.ritz_vectors(vectors[:, keep])
        self.V[:, :count] = kept
        self.V[:, count] = self.V[:, n]
        self.V[:, count + 1 :] = 0
        couplings = self.beta * vectors[n - 1, keep]
        couplings[np.abs(couplings) <= lock] = 0.0
        self.T[:] = 0.0
        self.T[np.arange(count), np.arange(count)] = theta[keep]
        self.T[count, :count] = self.T[:count, count] = couplings
        self.n = count
