"""The loss landscape around the trained parameters, and how far its quadratic model holds.

Along a unit direction v the loss is compared with its second-order Taylor model
q(t) = L(θ) + t gᵀv + (t²/2) vᵀAv, where A is the analysed curvature; for an eigenvector,
vᵀAv = λ. The 2-D grid spans the top two eigenvectors (Li et al., "Visualizing the Loss
Landscape of Neural Nets", NeurIPS 2018, use random directions; eigenvectors show the sharpest
plane).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._random import gaussian, make_generator
from .result import Landscape, LandscapeGrid, LandscapeLine

#: The quadratic model "holds" while |loss - model| <= this fraction of |model - loss(0)|.
QUADRATIC_TOLERANCE = 0.1


def landscape_radius(loss: float, top_eigenvalue: float) -> float:
    """The half-width r of the plotted range: the quadratic rises by 2·max(loss, 0.1) at ±r."""
    rise = 2.0 * max(abs(loss), 0.1)
    if not math.isfinite(top_eigenvalue) or top_eigenvalue <= 0:
        return 1.0
    return math.sqrt(2.0 * rise / top_eigenvalue)


def loss_landscape(
    op: Any,
    *,
    loss: float,
    gradient: torch.Tensor,
    eigenvalues: torch.Tensor,
    eigenvectors: torch.Tensor,
    seed: int,
    num_points: int = 21,
    grid_size: int = 15,
    advance: Callable[[], None] = lambda: None,
) -> Landscape:
    """Loss slices along the top eigenvector and a random direction, and over the top plane.

    Args:
        op: a model operator (offers ``loss(delta)`` and products).
        loss: the loss at the trained parameters.
        gradient: the flat gradient (P,).
        eigenvalues: the largest eigenvalues, descending (k,).
        eigenvectors: their unit eigenvectors as columns (P, k).
        seed: seed of the random direction.
        num_points: points of each 1-D slice (odd, so that t = 0 is one of them).
        grid_size: points per side of the 2-D grid (0 for none; needs k >= 2).
        advance: called after each loss evaluation (progress).

    Returns:
        A :class:`Landscape`.
    """
    lam = float(eigenvalues[0])
    radius = landscape_radius(loss, lam)
    ts = _symmetric_points(radius, num_points)
    top_direction = eigenvectors[:, 0]
    random_direction = gaussian(
        (op.shape[0],), make_generator(seed + 1), dtype=op.dtype, device=op.device
    )
    random_direction = random_direction / random_direction.norm()
    random_curvature = float(random_direction @ (op @ random_direction))
    lines = [
        _line(op, "top eigenvector", top_direction, lam, ts, loss, gradient, advance),
        _line(op, "random", random_direction, random_curvature, ts, loss, gradient, advance),
    ]
    grid = None
    if grid_size > 0 and eigenvectors.shape[1] >= 2:
        grid = _grid(op, eigenvalues, eigenvectors, radius, grid_size, loss, gradient, advance)
    evaluations = 2 * num_points + (grid_size**2 if grid is not None else 0)
    return Landscape(radius, lines[0], lines[1], grid, evaluations)


def _line(
    op: Any,
    name: str,
    direction: torch.Tensor,
    curvature: float,
    ts: list[float],
    loss0: float,
    gradient: torch.Tensor,
    advance: Callable[[], None],
) -> LandscapeLine:
    slope = float(gradient @ direction)
    losses = []
    for t in ts:
        losses.append(float(op.loss(t * direction)))
        advance()
    quadratic = [loss0 + slope * t + 0.5 * curvature * t * t for t in ts]
    radius = quadratic_radius(ts, losses, quadratic, loss0)
    return LandscapeLine(name, tuple(ts), tuple(losses), tuple(quadratic), slope, curvature, radius)


def quadratic_radius(
    ts: list[float], losses: list[float], quadratic: list[float], loss0: float
) -> float:
    """The largest |t| such that the model is within 10% of the loss change at every |s| <= |t|.

    Example:
        >>> quadratic_radius([-2.0, -1.0, 0.0, 1.0, 2.0], [9, 1, 0, 1, 9], [4, 1, 0, 1, 4], 0.0)
        1.0
    """
    order = sorted(range(len(ts)), key=lambda i: abs(ts[i]))
    radius = 0.0
    for i in order:
        change = abs(quadratic[i] - loss0)
        error = abs(losses[i] - quadratic[i])
        if error > QUADRATIC_TOLERANCE * change + 1e-12 * max(1.0, abs(loss0)):
            break
        radius = abs(ts[i])
    return radius


def _grid(
    op: Any,
    eigenvalues: torch.Tensor,
    eigenvectors: torch.Tensor,
    radius: float,
    size: int,
    loss0: float,
    gradient: torch.Tensor,
    advance: Callable[[], None],
) -> LandscapeGrid:
    axis = _symmetric_points(radius, size)
    v1, v2 = eigenvectors[:, 0], eigenvectors[:, 1]
    lam1, lam2 = float(eigenvalues[0]), float(eigenvalues[1])
    g1, g2 = float(gradient @ v1), float(gradient @ v2)
    losses, quadratic = [], []
    for a in axis:
        row, model_row = [], []
        for b in axis:
            row.append(float(op.loss(a * v1 + b * v2)))
            model_row.append(loss0 + a * g1 + b * g2 + 0.5 * (lam1 * a * a + lam2 * b * b))
            advance()
        losses.append(tuple(row))
        quadratic.append(tuple(model_row))
    return LandscapeGrid(tuple(axis), tuple(axis), tuple(losses), tuple(quadratic), (lam1, lam2))


def _symmetric_points(radius: float, count: int) -> list[float]:
    """``count`` evenly spaced points in [-radius, radius], the middle one exactly 0 when odd."""
    points = torch.linspace(-radius, radius, count, dtype=torch.float64)
    if count % 2:
        points[count // 2] = 0.0
    return points.tolist()
