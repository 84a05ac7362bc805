"""Extreme eigenvalues by thick-restart Lanczos with full reorthogonalisation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._checks import check_choice, check_int, value_error
from .._progress import progress_bar
from .._random import gaussian
from ._common import Counter, check_operator, check_tensor_for, check_tol, generator
from ._lanczos import ThickRestartLanczos
from ._results import Result

WHICH = ("largest", "smallest", "magnitude", "both")
_FUNC = "eigenvalues"
#: Explicit checks that may contradict the recurrence before giving up ("stagnated").
_CHECKS = 3


@dataclass(frozen=True, eq=False)
class EigenResult(Result):
    """Eigenvalues of a symmetric operator with their residuals.

    Attributes:
        values: (k,) float64 eigenvalues (2k for ``which="both"``), ordered: ``"largest"``
            descending, ``"smallest"`` ascending, ``"magnitude"`` by descending ``|value|``,
            ``"both"`` ascending (the k smallest first, then the k largest).
        vectors: (P, k) unit eigenvectors in the operator's dtype and device, or None.
        residual_norms: (k,) float64 ``||A v - value v||`` of the returned unit vectors,
            computed explicitly from the products (not from the Lanczos recurrence), never
            below ``10 eps ||A||_est`` (the rounding of one product); some eigenvalue of A lies
            within it of ``value``.
        converged: (k,) bool, ``residual_norm <= tol * max(|value|, sqrt(eps) * ||A||_est)``
            (eps of the operator's dtype, ``||A||_est`` the largest |Ritz value| seen), or
            ``<= tol * max(|value|, ||A||_est)`` with ``relative_to="norm"``.
        num_matvecs: products with the operator used.
        which: the part of the spectrum asked for.
        tol: the relative tolerance asked for.
        status: ``"converged"`` (all converged), ``"max_matvecs"`` (budget spent first) or
            ``"stagnated"`` (the recurrence claimed convergence three times but the explicit
            residuals missed ``tol``: rounding in the operator's dtype cannot deliver it).
        method: ``"lanczos"`` or ``"dense"`` (P products, for tiny operators).
        num_restarts: thick restarts done.
    """

    values: torch.Tensor
    vectors: torch.Tensor | None
    residual_norms: torch.Tensor
    converged: torch.Tensor
    num_matvecs: int
    which: str
    tol: float
    status: str
    method: str
    num_restarts: int

    _omit = ("vectors",)

    @property
    def all_converged(self) -> bool:
        """Whether every returned value converged."""
        return bool(self.converged.all())


def _pick(theta: np.ndarray, which: str, count: int) -> np.ndarray:
    """Indices of the ``count`` Ritz values (ascending ``theta``) most wanted, best first."""
    if which == "largest":
        return np.argsort(-theta, kind="stable")[:count]
    if which == "smallest":
        return np.argsort(theta, kind="stable")[:count]
    if which == "magnitude":
        return np.argsort(-np.abs(theta), kind="stable")[:count]
    count = min(count, len(theta))
    top, bottom = (count + 1) // 2, count // 2
    chosen = list(np.arange(len(theta))[::-1][:top]) + list(np.arange(len(theta))[:bottom])
    return np.array(chosen, dtype=int)


def _order(values: np.ndarray, which: str) -> np.ndarray:
    """The documented output order of ``values``."""
    if which == "largest":
        return np.argsort(-values, kind="stable")
    if which == "magnitude":
        return np.argsort(-np.abs(values), kind="stable")
    return np.argsort(values, kind="stable")


def _start_vector(v0: Any, op: Any, gen: torch.Generator) -> torch.Tensor:
    """The starting vector: random, ``v0``, or the sum of the orthonormalised columns of ``v0``."""
    size = op.shape[0]
    if v0 is None:
        return gaussian((size,), gen, dtype=op.dtype, device=op.device)
    v0 = check_tensor_for(_FUNC, "v0", v0, op, allow_block=True)
    if v0.ndim == 2:
        basis, _ = torch.linalg.qr(v0)
        v0 = basis.sum(dim=1)
    if not bool(torch.isfinite(v0).all()) or float(torch.linalg.vector_norm(v0)) == 0.0:
        raise value_error(_FUNC, "v0", "a finite, nonzero vector (or block)", v0)
    return v0


def _dense(apply: Counter, op: Any, want: int, which: str) -> tuple:
    """Exact path for tiny operators: the dense matrix from P products, then eigh in float64."""
    size = op.shape[0]
    matrix = apply(torch.eye(size, dtype=op.dtype, device=op.device))
    matrix = matrix.detach().to("cpu", torch.float64)
    matrix = (matrix + matrix.T) / 2
    theta, vectors = torch.linalg.eigh(matrix)
    chosen = torch.as_tensor(_pick(theta.numpy(), which, want))
    values, vecs = theta[chosen], vectors[:, chosen]
    residuals = torch.linalg.vector_norm(matrix @ vecs - vecs * values, dim=0)
    floor = 10 * size * torch.finfo(op.dtype).eps * float(theta.abs().max())
    return values.numpy(), vecs, residuals.clamp_min(floor).numpy(), float(theta.abs().max())


def _converged(values: np.ndarray, residuals: np.ndarray, tol: float, anorm: float, floor: float):
    """Per value: residual <= tol * max(|value|, floor * ||A||_est)."""
    return residuals <= tol * np.maximum(np.abs(values), floor * anorm)


def _lanczos(apply: Counter, start, want, which, tol, floor, budget, basis_size, gen, bar) -> tuple:
    """Run thick-restart Lanczos until the ``want`` wanted Ritz pairs converge or the budget.

    The recurrence residuals ``|beta s_last|`` decide when to look; the answer is then checked
    with explicit residuals from the stored products. If those miss ``tol`` while the
    recurrence claims it (rounding), iteration goes on; after ``_CHECKS`` such misses the
    status is ``"stagnated"``: the arithmetic cannot deliver ``tol``.
    """
    engine = ThickRestartLanczos(apply, start, basis_size, gen)
    eps, anorm, restarts, misses = engine.eps, 0.0, 0, 0
    while True:
        engine.step()
        theta, vectors, residuals = engine.ritz()
        anorm = max(anorm, float(np.abs(theta).max()))
        residuals = np.maximum(residuals, 10 * math.sqrt(engine.n) * eps * anorm)
        chosen = _pick(theta, which, want)
        claimed = len(chosen) == want and bool(
            _converged(theta[chosen], residuals[chosen], tol, anorm, floor).all()
        )
        bar.update(apply.count, residual=float(np.max(residuals[chosen] / max(anorm, 1e-300))))
        if claimed or apply.count >= budget:
            values, true, rows = engine.explicit(vectors[:, chosen])
            true = np.maximum(true, 10 * eps * anorm)
            if _converged(values, true, tol, anorm, floor).all():
                return values, rows, true, anorm, restarts, "converged"
            misses += claimed
            if apply.count >= budget or misses >= _CHECKS:
                status = "max_matvecs" if apply.count >= budget else "stagnated"
                return values, rows, true, anorm, restarts, status
        if engine.n == basis_size:
            nconv = int(_converged(theta[chosen], residuals[chosen], tol, anorm, floor).sum())
            keep = _keep_count(want, nconv, basis_size)
            engine.restart(_pick(theta, which, keep), theta, vectors, 10 * eps * anorm)
            restarts += 1


def _keep_count(want: int, nconv: int, basis_size: int) -> int:
    """Ritz vectors kept at a thick restart: the wanted ones plus a few (more as they converge)."""
    return min(want + max(2, min(nconv, (basis_size - want) // 2)), basis_size - 2)


def _check_k(k: Any, which: str, size: int) -> int:
    k = check_int(_FUNC, "k", k, minimum=1)
    limit = size // 2 if which == "both" else size
    if k > limit:
        what = "2k <= P" if which == "both" else "k <= P"
        raise value_error(
            _FUNC, "k", f"an integer with {what} = {size} for which={which!r}", k, "Ask for fewer."
        )
    return k


def default_basis_size(want: int) -> int:
    """Lanczos basis size before a thick restart (like ARPACK's ``ncv``).

    Convergence is checked after every product, so a larger basis costs memory, not products.
    """
    return max(2 * want + 10, 30)


def eigenvalues(
    op: Any,
    k: int = 6,
    *,
    which: str = "largest",
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    seed: int | torch.Generator = 0,
    v0: torch.Tensor | None = None,
    return_eigenvectors: bool = True,
    progress: bool = False,
    relative_to: str = "value",
) -> EigenResult:
    """The k extreme eigenvalues of a symmetric operator, with honest residual norms.

    Thick-restart Lanczos (Wu & Simon, SIAM J. Matrix Anal. Appl. 22(2), 2000) with full
    reorthogonalisation, so no ghost duplicates. Each Ritz pair ``(theta, y = V s)`` satisfies
    ``||A y - theta y|| = |beta_m s_m|`` exactly by the Lanczos relation, and some eigenvalue of
    A lies within that distance of theta. Convergence is checked after every product; converged
    pairs are kept at every restart and locked once exact to rounding. The reported residuals
    and the convergence flags come from explicit residuals ``||A y - theta y||`` computed from
    the stored products ``A V`` (no extra products), with inner products accumulated in float64,
    so they are true in float32 at millions of parameters too. Memory: two (m, P) blocks in the
    operator's dtype (basis and products), m = ``max(2k + 10, 30)``. Operators with
    ``P <= max(2k + 10, 30)`` (k doubled for "both") are solved exactly from P products.
    Like every single-vector Krylov method (ARPACK included) it may miss the second copy of a
    repeated eigenvalue when the wanted pairs converge before rounding brings that copy in.

    Args:
        op: a symmetric (P, P) operator (e.g. HessianOperator, DenseOperator).
        k: how many eigenvalues (from each end for ``which="both"``).
        which: ``"largest"`` (algebraic), ``"smallest"`` (algebraic, most negative first),
            ``"magnitude"`` (largest ``|lambda|``) or ``"both"`` (k from each end, 2k values).
        tol: relative tolerance on the residual: ``||A v - lambda v|| <= tol * |lambda|``
            (``tol * sqrt(eps) * ||A||_est`` for eigenvalues below ``sqrt(eps) ||A||``).
        max_matvecs: product budget; default ``min(max(20 k, 300), 10 P)``.
        seed: integer or ``torch.Generator`` for the random start vector.
        v0: warm start, a (P,) vector or a (P, m) block (e.g. earlier eigenvectors: their
            orthonormalised sum starts the Krylov space, which then contains them after m steps).
        return_eigenvectors: also return the (P, k) eigenvectors.
        progress: show a progress bar (products, largest relative residual) on stderr.
        relative_to: ``"value"`` (the tolerance above) or ``"norm"``: ``||A v - lambda v|| <=
            tol * max(|lambda|, ||A||_est)``, the accuracy a low-rank approximation of A needs
            (small eigenvalues only to ``tol`` of the largest), which converges where a
            spectrum clusters near 0.

    Returns:
        EigenResult with ``values``, ``vectors``, ``residual_norms``, ``converged``,
        ``num_matvecs`` and ``status``.

    Example:
        >>> import torch, curvscope
        >>> op = curvscope.DenseOperator(torch.diag(torch.arange(1.0, 31.0, dtype=torch.float64)))
        >>> curvscope.eigenvalues(op, k=2).values.tolist()
        [30.0, 29.0]
    """
    op = check_operator(op, _FUNC)
    which = check_choice(_FUNC, "which", which, WHICH)
    size = op.shape[0]
    k = _check_k(k, which, size)
    tol = check_tol(_FUNC, tol)
    relative_to = check_choice(_FUNC, "relative_to", relative_to, ("value", "norm"))
    # the fraction of ||A||_est below which |value| no longer scales the tolerance
    floor = 1.0 if relative_to == "norm" else math.sqrt(torch.finfo(op.dtype).eps)
    want = 2 * k if which == "both" else k
    budget = check_int(_FUNC, "max_matvecs", max_matvecs, minimum=want, allow_none=True)
    if budget is None:
        budget = max(min(max(20 * want, 300), 10 * size), want)
    gen = generator(_FUNC, seed)
    start = _start_vector(v0, op, gen)
    apply, basis_size = Counter(op), min(default_basis_size(want), size - 1)
    with progress_bar(progress, "eigenvalues", budget, unit="products", transient=False) as bar:
        if size <= default_basis_size(want) and (budget >= size or basis_size <= want):
            values, vecs, residuals, anorm = _dense(apply, op, want, which)
            rows, method, restarts, status = vecs.T, "dense", 0, None
        else:
            found = _lanczos(apply, start, want, which, tol, floor, budget, basis_size, gen, bar)
            values, rows, residuals, anorm, restarts, status = found
            method = "lanczos"
        bar.update(apply.count)
    order = _order(values, which)
    values, residuals = values[order], residuals[order]
    converged = _converged(values, residuals, tol, anorm, floor)
    if status is None or bool(converged.all()):
        status = "converged" if bool(converged.all()) else "max_matvecs"
    vectors = None
    if return_eigenvectors:
        rows = rows[torch.as_tensor(order, device=rows.device)]
        vectors = rows.to(dtype=op.dtype, device=op.device).T.contiguous()
    return EigenResult(
        values=torch.as_tensor(values, dtype=torch.float64),
        vectors=vectors,
        residual_norms=torch.as_tensor(residuals, dtype=torch.float64),
        converged=torch.as_tensor(converged, dtype=torch.bool),
        num_matvecs=apply.count,
        which=which,
        tol=tol,
        status=status,
        method=method,
        num_restarts=restarts,
    )
