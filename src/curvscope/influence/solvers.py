"""Inverse-curvature products ``(C + λI)⁻¹ B`` for blocks B (P, k), one solver per class.

``C = op / scale`` is the curvature of the MEAN training loss (``scale`` is n for an operator of
a sum-reduced loss, else 1). Every solver is set up once (a factorisation, eigenpairs, a step
size) and then applied to many blocks; each application returns the solution and a
:class:`SolveStatus` that says how far to trust it.

- ``"exact"``: the structured operator's own exact ``inverse(damping)`` when it has one (KFAC,
  EKFAC, diagonal), else the dense matrix from P products and its eigendecomposition.
- ``"cg"``: conjugate gradients (Hestenes & Stiefel 1952) on every column at once, one
  ``matmat`` per iteration over the columns not yet converged.
- ``"lowrank"``: the top ``rank`` eigenpairs (V, μ) by Lanczos and
  ``V diag(1/(μ+λ)) Vᵀ + (I − VVᵀ)/λ`` (Schioppa et al. 2022, "Scaling up influence functions").
- ``"lissa"``: the Neumann series / Richardson iteration ``z ← z + b − (C+λI) z / s`` with
  ``s`` above the top eigenvalue, whose result is ``z / s`` (Agarwal et al. 2017; Koh & Liang
  2017). With full-data products it is deterministic; it converges like ``(1 − λ/s)^t``.
- ``"identity"``: ``C = I``, so ``(C + λI)⁻¹ = I / (1 + λ)`` (gradient similarity).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..estimators import eigenvalues
from ..estimators._results import Result

#: Columns per product when the dense matrix is built.
DENSE_CHUNK = 256


@dataclass(frozen=True, eq=False)
class SolveStatus(Result):
    """How an inverse-curvature product was computed and how well.

    Attributes:
        solver: ``"exact"``, ``"cg"``, ``"lowrank"``, ``"lissa"`` or ``"identity"``.
        num_columns: right-hand sides solved.
        num_converged: how many met ``tol`` (all of them for the direct solvers).
        max_relative_residual: the largest ``‖b − (C+λI)x‖ / ‖b‖`` (recomputed with one product
            per column for the iterative solvers; None for the direct ones).
        num_matvecs: curvature products used (set-up included for the first application).
        status: ``"converged"``, ``"exact"``, ``"not converged"`` (some columns missed ``tol``
            within the budget) or ``"not positive definite"`` (C + λI has an eigenvalue <= 0).
    """

    solver: str
    num_columns: int
    num_converged: int
    max_relative_residual: float | None
    num_matvecs: int
    status: str


class _Solver:
    """Applies ``(C + λI)⁻¹`` to blocks; subclasses implement ``_setup`` and ``_apply``."""

    name = ""

    def __init__(self, op: Any, scale: float, damping: float, options: dict[str, Any]) -> None:
        self.op, self.scale, self.damping, self.options = op, scale, damping, options
        self.num_matvecs = 0
        self._pending = 0  # set-up products not yet reported
        self._definite = True

    def _product(self, block: torch.Tensor) -> torch.Tensor:
        """``C @ block`` (the mean-loss curvature), counting the products."""
        self.num_matvecs += block.shape[1]
        self._pending += block.shape[1]
        return self.op.matmat(block) / self.scale

    def setup_curvature(self) -> None:
        """Everything that depends on the curvature only (a factorisation, eigenpairs)."""

    def mean_eigenvalue(self) -> float | None:
        """``trace(C) / P`` when the set-up knows it exactly, else None."""
        return None

    def set_damping(self, damping: float) -> None:
        """Fix λ; solvers that depend on it finish their set-up here."""
        self.damping = damping

    def __call__(self, block: torch.Tensor) -> tuple[torch.Tensor, SolveStatus]:
        solution, converged, residual, status = self._apply(block)
        used, self._pending = self._pending, 0
        if not self._definite:
            status = "not positive definite"
        result = SolveStatus(self.name, block.shape[1], converged, residual, used, status)
        return solution, result

    def _apply(self, block: torch.Tensor) -> tuple[torch.Tensor, int, float | None, str]:
        raise NotImplementedError


class IdentitySolver(_Solver):
    name = "identity"

    def _apply(self, block):
        return block / (1.0 + self.damping), block.shape[1], None, "exact"


class ExactSolver(_Solver):
    """The structured exact inverse, or the eigendecomposition of the dense matrix."""

    name = "exact"

    def setup_curvature(self) -> None:
        self.structured = callable(getattr(self.op, "inverse", None))
        if self.structured:
            return
        size = self.op.shape[0]
        dense = torch.empty(size, size, dtype=self.op.dtype, device=self.op.device)
        for start in range(0, size, DENSE_CHUNK):
            stop = min(start + DENSE_CHUNK, size)
            eye = torch.zeros(size, stop - start, dtype=self.op.dtype, device=self.op.device)
            eye[torch.arange(start, stop), torch.arange(stop - start)] = 1
            dense[:, start:stop] = self._product(eye)
        self.values, self.vectors = torch.linalg.eigh((dense + dense.T) / 2)

    def mean_eigenvalue(self) -> float | None:
        if self.structured:
            value = self.op.trace() if callable(getattr(self.op, "trace", None)) else None
            value = getattr(value, "value", value)  # a float, a 0-d tensor or a result
            return None if value is None else float(value) / self.scale / self.op.shape[0]
        return float(self.values.mean())

    def set_damping(self, damping: float) -> None:
        self.damping = damping
        if self.structured:
            self.inverse = self.op.inverse(damping * self.scale)
            return
        shifted = self.values + damping
        self._definite = bool((shifted > 0).all())
        self.inverse_values = 1.0 / shifted

    def _apply(self, block):
        if self.structured:
            solution = self.inverse @ block
            if self.scale != 1:  # in place: the solution of a big block is held once
                solution.mul_(self.scale)
            return solution, block.shape[1], None, "exact"
        coefficients = self.vectors.T @ block
        solution = self.vectors @ (coefficients * self.inverse_values[:, None])
        return solution, block.shape[1], None, "exact"


class LowRankSolver(_Solver):
    """Top eigenpairs of C exactly inverted, the rest of the space at ``1/λ``."""

    name = "lowrank"

    def setup_curvature(self) -> None:
        rank = min(self.options["rank"], self.op.shape[0])
        found = eigenvalues(self.op, k=rank, which="largest", tol=1e-6, seed=self.options["seed"])
        self.num_matvecs += found.num_matvecs
        self._pending += found.num_matvecs
        self.values = found.values.to(self.op.dtype).to(self.op.device) / self.scale
        self.vectors = found.vectors
        self.residuals = found.residual_norms.to(self.op.dtype).to(self.op.device) / self.scale

    def set_damping(self, damping: float) -> None:
        if not damping > 0:
            raise ValueError(
                "curvscope.InfluenceFunction(damping=...): expected a number > 0 with "
                f"solver='lowrank', got {damping}. Pass damping>0."
            )
        self.damping = damping
        self._definite = bool((self.values + damping > 0).all())
        # an eigenpair with residual r moves (C + λI)⁻¹ by about r / λ² relative to 1/λ
        worst = float(self.residuals.max()) / damping
        if worst > 1e-3:
            warnings.warn(
                f"curvscope.InfluenceFunction(solver='lowrank'): the eigenpairs have residuals "
                f"up to {worst:.2g} x damping; the low-rank inverse is approximate. Raise "
                "damping or lower rank.",
                RuntimeWarning,
                stacklevel=4,
            )

    def _apply(self, block):
        coefficients = self.vectors.T @ block
        inside = 1.0 / (self.values + self.damping) - 1.0 / self.damping
        solution = block / self.damping + self.vectors @ (coefficients * inside[:, None])
        return solution, block.shape[1], None, "exact"


class CGSolver(_Solver):
    """Conjugate gradients on every column at once (see the module docstring)."""

    name = "cg"

    def _apply(self, block):
        tol, budget = self.options["tol"], self.options["max_matvecs"]
        solution, failed = _block_cg(self._damped, block, tol, budget)
        if failed.any():
            self._definite = False
        return _finish(self, block, solution, tol)

    def _damped(self, block: torch.Tensor) -> torch.Tensor:
        return self._product(block) + self.damping * block


class LissaSolver(_Solver):
    """Richardson iteration on ``(C + λI) / s`` (see the module docstring)."""

    name = "lissa"

    def setup_curvature(self) -> None:
        top = eigenvalues(self.op, k=1, which="largest", tol=1e-3, seed=self.options["seed"])
        self.num_matvecs += top.num_matvecs
        self._pending += top.num_matvecs
        self.largest = (float(top.values[0]) + float(top.residual_norms[0])) / self.scale

    def set_damping(self, damping: float) -> None:
        self.damping = damping
        self.step_scale = 1.1 * max(self.largest + damping, 1e-30)

    def _apply(self, block):
        tol, budget = self.options["tol"], self.options["max_matvecs"]
        z = block.clone()
        target = tol * torch.linalg.vector_norm(block, dim=0)
        active = torch.ones(block.shape[1], dtype=torch.bool, device=block.device)
        for _ in range(budget):
            columns = active.nonzero().squeeze(1)
            if columns.numel() == 0:
                break
            part = z[:, columns]
            image = self._product(part) + self.damping * part
            residual = block[:, columns] - image / self.step_scale
            z[:, columns] = part + residual
            norms = torch.linalg.vector_norm(residual, dim=0)
            active[columns] = norms > target[columns]
        return _finish(self, block, z / self.step_scale, tol)


def _finish(solver: _Solver, block, solution, tol) -> tuple[torch.Tensor, int, float, str]:
    """Recompute every column's residual with one product each; count the converged ones."""
    image = solver._product(solution) + solver.damping * solution
    norms = torch.linalg.vector_norm(block, dim=0).clamp_min(torch.finfo(block.dtype).tiny)
    relative = torch.linalg.vector_norm(block - image, dim=0) / norms
    converged = int((relative <= tol).sum())
    status = "converged" if converged == block.shape[1] else "not converged"
    return solution, converged, float(relative.max()), status


def _block_cg(apply, rhs: torch.Tensor, tol: float, budget: int):
    """CG from x = 0 on each column of ``rhs`` (its own step sizes), stopping column by column.

    Returns the solutions and a bool mask of the columns that met a direction of non-positive
    curvature (their last iterate is kept).
    """
    x = torch.zeros_like(rhs)
    residual, direction = rhs.clone(), rhs.clone()
    rho = (residual * residual).sum(0)
    target = (tol * torch.linalg.vector_norm(rhs, dim=0)) ** 2
    active, failed = rho > target, torch.zeros_like(rho, dtype=torch.bool)
    for _ in range(budget):
        columns = active.nonzero().squeeze(1)
        if columns.numel() == 0:
            break
        d = direction[:, columns]
        image = apply(d)
        curvature = (d * image).sum(0)
        bad = ~(curvature > 0)
        failed[columns[bad]] = True
        step = torch.where(bad, torch.zeros_like(curvature), rho[columns] / curvature)
        x[:, columns] += step * d
        r = residual[:, columns] - step * image
        new_rho = (r * r).sum(0)
        residual[:, columns] = r
        direction[:, columns] = r + (new_rho / rho[columns].clamp_min(1e-300)) * d
        rho[columns] = new_rho
        active[columns] = (new_rho > target[columns]) & ~bad
    return x, failed


SOLVERS = {
    "exact": ExactSolver,
    "cg": CGSolver,
    "lowrank": LowRankSolver,
    "lissa": LissaSolver,
    "identity": IdentitySolver,
}
