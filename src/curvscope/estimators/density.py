"""Spectral density by stochastic Lanczos quadrature, probes processed as a block."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._checks import check_float, check_int
from .._random import rademacher
from ._common import Counter, check_operator, generator
from ._lanczos import norm, orthogonalise
from ._progress import Progress
from ._results import Result

_FUNC = "spectral_density"
#: Largest Lanczos basis held at once (entries), which bounds how many probes share a block.
_MAX_BASIS_ENTRIES = 2**27


@dataclass(frozen=True, eq=False)
class SpectralDensity(Result):
    """The spectral density of A as a mixture of Gauss quadrature nodes (one rule per probe).

    The eigenvalue distribution (1/P) sum_i delta(lambda_i) is approximated by
    (1/num_probes) sum_p sum_j weights[p, j] delta(nodes[p, j]); each row of weights sums to 1.

    Attributes:
        nodes: (num_probes, lanczos_steps) float64 Ritz values (Gauss nodes) per probe.
        weights: (num_probes, lanczos_steps) float64 weights (squared first components).
        lower, upper: estimated bounds of the spectrum: the extreme nodes widened by their
            Ritz residual norms.
        num_matvecs: products used.
        num_probes, lanczos_steps: the settings used (1 and P for the exact method).
        method: ``"slq"``, or ``"exact"`` when P <= num_probes * lanczos_steps: then the P
            eigenvalues of the dense matrix from P products, each of weight 1/P, cost no more.
        status: ``"exact"`` (the exact method) or ``"estimated"`` (stochastic Lanczos
            quadrature: the error, from the probes and the finite number of steps, is not
            estimated; compare two seeds or more probes).
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    lower: float
    upper: float
    num_matvecs: int
    num_probes: int
    lanczos_steps: int
    method: str = "slq"
    status: str = "estimated"

    def atoms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat (nodes, weights) of the approximating distribution, weights summing to 1."""
        return self.nodes.reshape(-1), self.weights.reshape(-1) / self.num_probes

    def density(self, grid: Any, sigma: float | None = None) -> Any:
        """The Gaussian-smoothed density on ``grid``; it integrates to 1 over the real line.

        Args:
            grid: points (tensor, array or list) where to evaluate it.
            sigma: kernel width; default (upper - lower) / 100.

        Returns:
            The density at ``grid`` (a numpy array for numpy/list input, else a float64 tensor).
        """
        if sigma is None:
            sigma = max(self.upper - self.lower, 1e-300) / 100
        sigma = check_float(
            "SpectralDensity.density", "sigma", sigma, minimum=0.0, open_interval=True
        )
        is_tensor = isinstance(grid, torch.Tensor)
        points = torch.as_tensor(np.asarray(grid.cpu() if is_tensor else grid, dtype=np.float64))
        nodes, weights = self.atoms()
        scaled = (points.reshape(-1, 1) - nodes) / sigma
        kernel = torch.exp(-0.5 * scaled**2) / (sigma * math.sqrt(2 * math.pi))
        curve = (kernel * weights).sum(dim=1)
        curve = curve.reshape(points.shape)
        return curve if is_tensor else curve.numpy()


def _lanczos_block(apply: Counter, probes: torch.Tensor, steps: int) -> tuple:
    """Independent Lanczos runs, one per column of ``probes``, sharing block products.

    Each probe's basis is a contiguous (steps, P) block of rows, reorthogonalised with the
    float64-accumulated Gram-Schmidt of the eigenvalue engine (``_lanczos``), so that float32
    at millions of parameters keeps its basis orthonormal.

    Returns alpha (b, steps), beta (b, steps) (beta[:, j] couples steps j and j + 1; zero after
    an invariant subspace, when that probe stops taking products).
    """
    size, count = probes.shape
    basis = torch.empty(count, steps, size, dtype=probes.dtype, device=probes.device)
    alpha, beta = np.zeros((count, steps)), np.zeros((count, steps))
    rows = probes.T.contiguous()
    for probe in range(count):
        basis[probe, 0] = rows[probe] / norm(rows[probe])
    active = list(range(count))
    eps = torch.finfo(probes.dtype).eps
    for step in range(steps):
        if not active:
            break
        block = basis[active, step].T.contiguous()
        images = apply(block).T.contiguous()
        still = []
        for index, probe in enumerate(active):
            vector = images[index]
            scale = norm(vector)
            alpha[probe, step] = orthogonalise(basis[probe, : step + 1], vector)[step]
            length = norm(vector)
            if length <= 100 * eps * max(scale, 1e-300):
                continue  # invariant subspace: beta stays 0 and this probe stops
            beta[probe, step] = length
            if step + 1 < steps:
                basis[probe, step + 1] = vector / length
                still.append(probe)
        active = still
    return alpha, beta


def _quadrature(alpha: np.ndarray, beta: np.ndarray) -> tuple:
    """Gauss rule of each probe's tridiagonal matrix: nodes, weights, and residual bounds."""
    count, steps = alpha.shape
    nodes, weights = np.zeros((count, steps)), np.zeros((count, steps))
    lows, highs = [], []
    for probe in range(count):
        broken = np.nonzero(beta[probe, :-1] == 0)[0]
        length = int(broken[0]) + 1 if len(broken) else steps
        diag, off = alpha[probe, :length], beta[probe, : length - 1]
        matrix = np.diag(diag) + np.diag(off, 1) + np.diag(off, -1)
        theta, vectors = np.linalg.eigh(matrix)
        residual = np.abs(beta[probe, length - 1] * vectors[-1, :])
        nodes[probe, :length], weights[probe, :length] = theta, vectors[0, :] ** 2
        nodes[probe, length:] = theta[-1]
        lows.append(theta[0] - residual[0])
        highs.append(theta[-1] + residual[-1])
    return nodes, weights, min(lows), max(highs)


def _exact(apply: Counter, op: Any) -> SpectralDensity:
    """The exact eigenvalue distribution from the dense matrix (P products)."""
    size = op.shape[0]
    matrix = apply(torch.eye(size, dtype=op.dtype, device=op.device))
    matrix = matrix.detach().to("cpu", torch.float64)
    eigs = torch.linalg.eigvalsh((matrix + matrix.T) / 2)
    return SpectralDensity(
        nodes=eigs[None, :],
        weights=torch.full((1, size), 1.0 / size, dtype=torch.float64),
        lower=float(eigs[0]),
        upper=float(eigs[-1]),
        num_matvecs=apply.count,
        num_probes=1,
        lanczos_steps=size,
        method="exact",
        status="exact",
    )


def spectral_density(
    op: Any,
    *,
    num_probes: int = 8,
    lanczos_steps: int = 48,
    seed: int | torch.Generator = 0,
    progress: bool = False,
) -> SpectralDensity:
    """The spectral density of a symmetric operator by stochastic Lanczos quadrature.

    For a unit probe v, v^T f(A) v = sum_i (u_i^T v)^2 f(lambda_i) ~ sum_j w_j f(theta_j): the
    Gauss rule from m Lanczos steps started at v (nodes theta_j the Ritz values, weights w_j the
    squared first components of their eigenvectors). Averaging over Rademacher probes estimates
    (1/P) sum_i f(lambda_i) (Ubaru, Chen & Saad, SIAM J. Matrix Anal. Appl. 38(4), 2017). Each
    probe's basis is fully reorthogonalised; probes share block products. When
    ``P <= num_probes * lanczos_steps`` the exact distribution costs no more (P products) and
    is returned instead (``method="exact"``).

    Args:
        op: a symmetric (P, P) operator.
        num_probes: number of random probes (>= 1).
        lanczos_steps: Lanczos steps per probe (>= 1; capped at P). Uses
            ``num_probes * lanczos_steps`` products at most.
        seed: integer or ``torch.Generator`` for the probes.
        progress: show a progress bar on stderr.

    Returns:
        SpectralDensity with ``nodes``, ``weights``, ``lower``, ``upper``, ``num_matvecs`` and
        ``density(grid, sigma)``.

    Example:
        >>> import torch, curvscope
        >>> op = curvscope.DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0]).double()))
        >>> [round(x, 6) for x in curvscope.spectral_density(op).nodes[0].tolist()]
        [1.0, 2.0, 3.0]
    """
    op = check_operator(op, _FUNC)
    num_probes = check_int(_FUNC, "num_probes", num_probes, minimum=1)
    steps = min(check_int(_FUNC, "lanczos_steps", lanczos_steps, minimum=1), op.shape[0])
    gen = generator(_FUNC, seed)
    size, apply = op.shape[0], Counter(op)
    if size <= num_probes * steps:
        return _exact(apply, op)
    group = max(1, min(num_probes, _MAX_BASIS_ENTRIES // max(steps * size, 1)))
    alphas, betas = [], []
    with Progress(progress, "spectral density", num_probes * steps) as bar:
        for start in range(0, num_probes, group):
            count = min(group, num_probes - start)
            probes = rademacher((size, count), gen, dtype=op.dtype, device=op.device)
            alpha, beta = _lanczos_block(apply, probes, steps)
            alphas.append(alpha)
            betas.append(beta)
            bar.update(apply.count)
    nodes, weights, lower, upper = _quadrature(np.concatenate(alphas), np.concatenate(betas))
    return SpectralDensity(
        nodes=torch.as_tensor(nodes),
        weights=torch.as_tensor(weights),
        lower=float(lower),
        upper=float(upper),
        num_matvecs=apply.count,
        num_probes=num_probes,
        lanczos_steps=steps,
        status="estimated",
    )
