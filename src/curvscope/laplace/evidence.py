"""The log marginal likelihood (evidence) of a Laplace approximation and its maximisation.

With Λ = s·C + diag(δ) (δ constant within each layer g, P_g parameters there):

    log Z(δ) = Σ_n log p(y_n | f(x_n; θ_MAP)) − ½ [log det Λ − Σ_g P_g log δ_g] − ½ Σ_g δ_g ‖θ_g‖²

(MacKay 1992, "A practical Bayesian framework for backpropagation networks"; Immer et al. 2021,
"Scalable marginal likelihood estimation for model selection in deep learning"). Its gradient
in log δ_g is ½ [P_g − δ_g tr_g(Λ⁻¹) − δ_g ‖θ_g‖²], with tr_g the trace over layer g.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.optimize
import torch

from .posterior import Structure

#: The prior precisions searched: this range of log10 δ, and the coarse grid over it.
LOG10_RANGE = (-6.0, 6.0)
GRID_POINTS = 49


def log_evidence(
    log_likelihood: float,
    structure: Structure,
    scale: float,
    prior: torch.Tensor,
    theta: torch.Tensor,
) -> float:
    """The log marginal likelihood for a (P,) prior precision vector (see the module)."""
    logdet = structure.logdet(scale, prior)
    log_prior_det = float(prior.log().sum())
    penalty = float((prior * theta.to(prior.dtype) ** 2).sum())
    return log_likelihood - 0.5 * (logdet - log_prior_det) - 0.5 * penalty


def group_traces(
    structure: Structure, scale: float, prior: torch.Tensor, slices: list[slice]
) -> np.ndarray:
    """tr_g(Λ⁻¹) for each group; block structures by a central difference of log det."""
    if structure.name == "kfac" or not hasattr(structure, "inverse_diagonal"):
        out = []
        for part in slices:
            step = 1e-4
            up, down = prior.clone(), prior.clone()
            up[part] *= math.exp(step)
            down[part] *= math.exp(-step)
            derivative = (structure.logdet(scale, up) - structure.logdet(scale, down)) / (2 * step)
            out.append(derivative / float(prior[part][0]))
        return np.asarray(out)
    diagonal = structure.inverse_diagonal(scale, prior)
    return np.asarray([float(diagonal[part].sum()) for part in slices])


def maximise(
    objective: Callable[[torch.Tensor], float],
    gradient: Callable[[torch.Tensor], np.ndarray],
    expand: Callable[[np.ndarray], torch.Tensor],
    num_groups: int,
) -> np.ndarray:
    """Maximise the evidence over log δ (one value per group); returns the optimal δ.

    A coarse grid over a common δ finds the basin; Brent's method (one group) or L-BFGS-B with
    the analytic gradient (several) then refines within ``LOG10_RANGE``.
    """
    low, high = (value * math.log(10) for value in LOG10_RANGE)
    grid = np.linspace(low, high, GRID_POINTS)
    values = [objective(expand(np.full(num_groups, math.exp(x)))) for x in grid]
    best = int(np.nanargmax(values))
    start = np.full(num_groups, grid[best])
    if num_groups == 1:  # one δ: Brent's method between the grid neighbours of the best point
        low_end, high_end = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        found = scipy.optimize.minimize_scalar(
            lambda x: -objective(expand(np.full(1, math.exp(x)))),
            bounds=(low_end, high_end),
            method="bounded",
            options={"xatol": 1e-9},
        )
        return np.exp(np.full(1, found.x if -found.fun >= values[best] else grid[best]))

    def negative(log_delta: np.ndarray) -> tuple[float, np.ndarray]:
        prior = expand(np.exp(log_delta))
        return -objective(prior), -gradient(prior)

    found = scipy.optimize.minimize(
        negative,
        start,
        jac=True,
        method="L-BFGS-B",
        bounds=[(low, high)] * num_groups,
        options={"maxiter": 200, "ftol": 1e-13, "gtol": 1e-9},
    )
    best = found.x if -found.fun >= max(values) else start
    return np.exp(best)
