"""Output-space columns whose outer products give a batch's curvature on the model output.

For one batch with output ``f`` (n, ...) and summed loss ``S_b``, the columns ``c_1 .. c_k``
(each shaped like ``f``) satisfy ``Σ_c c cᵀ = s · M_b`` with ``s`` the dataset normalisation
(``1/Z`` for a mean, 1 for a sum) and ``M_b``:

- ``"ggn"``: the Hessian ``∂²S_b/∂f²`` (a square root of it, example by example);
- ``"monte_carlo"``: ``(1/S) Σ_s ĝ ĝᵀ`` of the summed negative log-likelihood's output
  gradients at S labels drawn from the model;
- ``"empirical"``: ``Σ_n g_n g_nᵀ`` with g_n the output gradient of example n's summed loss
  terms at its true label;

the conventions of ``GGNOperator`` and ``FisherOperator``, so that ``Σ_c (Jᵀc)(Jᵀc)ᵀ`` summed
over batches is their matrix.

``positions="exact"`` gives a square root per example over its whole output (cross-entropy on
(n, C, T): C·T columns, each nonzero at one position); ``positions="shared"`` (KFAC) uses the
class dimension only (cross-entropy) or the last dimension (MSE), each column set at every
position at once, which treats positions like examples (Eschenhagen et al., 2023).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .data import Batch
from .losses import (
    LossSpec,
    _cross_entropy_closed_form,
    _cross_entropy_scale,
    output_gradients,
    sampled_output_gradients,
)


def _per_position(shared: torch.Tensor, position_dims: list[int]) -> torch.Tensor:
    """Split columns set at every position into one column per (column, position)."""
    if not position_dims:
        return shared
    out_shape = shared.shape[1:]
    sizes = [out_shape[d] for d in position_dims]
    count = math.prod(sizes)
    mask = torch.eye(count, dtype=shared.dtype, device=shared.device).reshape(count, *sizes)
    view = [count] + [1] * len(out_shape)
    for d, size in zip(position_dims, sizes, strict=True):
        view[1 + d] = size
    masked = shared.unsqueeze(1) * mask.reshape(view).unsqueeze(0)
    return masked.reshape(-1, *out_shape)


def _cross_entropy_columns(spec: LossSpec, output: torch.Tensor, targets: Any) -> torch.Tensor:
    """``sqrt(s) · sqrt(p_c) (e_c - p)`` per position: ``S Sᵀ = s (diag p - p pᵀ)`` as Σ p = 1."""
    probs = torch.softmax(output.detach(), dim=1)
    scale = _cross_entropy_scale(spec, targets, output.dtype).unsqueeze(1)  # (n, 1, ...)
    classes = probs.shape[1]
    eye = torch.eye(classes, dtype=output.dtype, device=output.device)
    eye = eye.reshape(classes, 1, classes, *([1] * (output.ndim - 2)))
    root = torch.sqrt(probs).movedim(1, 0).unsqueeze(2)  # (C, n, 1, ...)
    return root * (eye - probs.unsqueeze(0)) * torch.sqrt(scale).unsqueeze(0)


def _mse_columns(output: torch.Tensor) -> torch.Tensor:
    """``sqrt(2) e_d`` along the last dimension at every position: the summed MSE's Hessian."""
    factor = 2.0
    size = output.shape[-1]
    eye = torch.eye(size, dtype=output.dtype, device=output.device)
    eye = eye.reshape(size, *([1] * (output.ndim - 1)), size)
    return math.sqrt(factor) * eye.expand(size, *output.shape)


def _autograd_columns(hessian_matmat: Callable, output: torch.Tensor) -> torch.Tensor:
    """A per-example square root of the loss Hessian, from its (n, d, d) blocks by eigh."""
    n, rest = output.shape[0], output.shape[1:]
    size = math.prod(rest)
    basis = torch.eye(size, dtype=output.dtype, device=output.device).reshape(size, 1, *rest)
    hess = hessian_matmat(basis.expand(-1, n, *rest).contiguous())
    blocks = hess.reshape(size, n, size).permute(1, 2, 0)
    values, vectors = torch.linalg.eigh((blocks + blocks.mT) / 2)
    roots = vectors * torch.sqrt(values.clamp_min(0)).unsqueeze(1)  # (n, d, k)
    return roots.permute(2, 0, 1).reshape(size, n, *rest)


def ggn_columns(
    spec: LossSpec,
    output: torch.Tensor,
    targets: Any,
    hessian_matmat: Callable,
    positions: str,
) -> torch.Tensor:
    """Columns (k, *output.shape) of a square root of the summed batch loss's Hessian."""
    if _cross_entropy_closed_form(spec, output, targets):
        shared = _cross_entropy_columns(spec, output, targets)
        if positions == "shared":
            return shared
        return _per_position(shared, list(range(2, output.ndim)))
    if spec.kind == "mse" and output.ndim >= 2:
        shared = _mse_columns(output)
        if positions == "shared":
            return shared
        return _per_position(shared, list(range(1, output.ndim - 1)))
    return _autograd_columns(hessian_matmat, output)


def output_columns(
    spec: LossSpec,
    output: torch.Tensor,
    batch: Batch,
    *,
    fisher: str,
    scale: float,
    hessian_matmat: Callable,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
    positions: str = "exact",
) -> torch.Tensor:
    """Columns (k, *output.shape) with ``Σ_c c cᵀ = scale · M_b`` (see the module docstring)."""
    output = output.detach()
    if fisher == "ggn":
        return math.sqrt(scale) * ggn_columns(
            spec, output, batch.targets, hessian_matmat, positions
        )
    if fisher == "empirical":
        gradients = output_gradients(spec, output, batch.targets, batch.size)
        return math.sqrt(scale) * gradients.detach().unsqueeze(0)
    gradients = sampled_output_gradients(spec, output, batch.targets, generator, num_samples)
    return math.sqrt(scale / num_samples) * gradients
