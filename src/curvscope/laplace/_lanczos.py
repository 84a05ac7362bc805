"""``f(A) z`` for a symmetric positive definite operator by the Lanczos method.

Used for samples ``A^{-1/2} z`` from structured posteriors whose square root is not at hand.
Each column of ``z`` runs its own Krylov sequence (all vectorised, full reorthogonalisation);
the estimate ``‖z‖ Q_m f(T_m) e_1`` is checked every few steps until it stops changing
(Golub & Van Loan, "Matrix Computations", 4th ed., §10.1; Chow & Saad 2014, "Preconditioned
Krylov subspace methods for sampling multivariate Gaussian distributions").
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: Columns are processed in chunks so that the stored basis has at most this many entries.
BASIS_ENTRIES = 2**26
CHECK_EVERY = 5


def lanczos_function(
    matmat: Callable[[torch.Tensor], torch.Tensor],
    vectors: torch.Tensor,
    function: Callable[[torch.Tensor], torch.Tensor],
    *,
    max_steps: int = 300,
    tol: float | None = None,
) -> tuple[torch.Tensor, bool]:
    """``f(A) V`` for ``V`` (P, k), and whether every column met ``tol`` (relative change)."""
    size, count = vectors.shape
    tol = tol if tol is not None else (1e-10 if vectors.dtype == torch.float64 else 1e-5)
    steps = max(1, min(max_steps, size))
    chunk = max(1, BASIS_ENTRIES // max(size * steps, 1))
    results, converged = [], True
    for start in range(0, count, chunk):
        result, ok = _lanczos_columns(
            matmat, vectors[:, start : start + chunk], function, steps, tol
        )
        results.append(result)
        converged = converged and ok
    return torch.cat(results, dim=1), converged


def _lanczos_columns(matmat, vectors, function, steps, tol) -> tuple[torch.Tensor, bool]:
    norms = vectors.norm(dim=0)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    basis = [vectors / safe]
    alphas, betas = [], []
    previous = None
    for step in range(steps):
        current = basis[-1]
        w = matmat(current)
        alpha = (current * w).sum(dim=0)
        stacked = torch.stack(basis)  # (m, P, k)
        w = w - torch.einsum("mpk,mk->pk", stacked, torch.einsum("mpk,pk->mk", stacked, w))
        w = w - torch.einsum("mpk,mk->pk", stacked, torch.einsum("mpk,pk->mk", stacked, w))
        beta = w.norm(dim=0)
        alphas.append(alpha)
        last = step == steps - 1
        if (step + 1) % CHECK_EVERY == 0 or last:
            estimate = _estimate(basis, alphas, betas, function, norms)
            if previous is not None:
                change = (estimate - previous).norm(dim=0) / estimate.norm(dim=0).clamp_min(1e-300)
                if bool((change <= tol).all()):
                    return estimate, True
            previous = estimate
        tiny = beta <= 1e-12 * alpha.abs().clamp_min(1e-300)
        if bool(tiny.all()) or last:
            return _estimate(basis, alphas, betas, function, norms), bool(tiny.all())
        betas.append(torch.where(tiny, torch.zeros_like(beta), beta))
        basis.append(torch.where(tiny, torch.zeros_like(w), w / beta.clamp_min(1e-300)))
    return previous, False  # pragma: no cover - the loop always returns


def _estimate(basis, alphas, betas, function, norms) -> torch.Tensor:
    """``‖z‖ Q_m f(T_m) e_1`` for every column."""
    m = len(alphas)
    diag = torch.stack(alphas, dim=1)  # (k, m)
    tri = torch.diag_embed(diag)
    if m > 1:
        off = torch.stack(betas[: m - 1], dim=1)
        tri = tri + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
    values, vecs = torch.linalg.eigh(tri.to(torch.float64))
    coefficients = vecs @ (function(values.clamp_min(1e-300)) * vecs[:, 0, :]).unsqueeze(-1)
    coefficients = coefficients[..., 0].to(basis[0].dtype)  # (k, m)
    stacked = torch.stack(basis[:m])  # (m, P, k)
    return torch.einsum("mpk,km->pk", stacked, coefficients) * norms
