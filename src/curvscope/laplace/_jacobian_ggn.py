"""The GGN of a model with per-example outputs (n, K) from per-example Jacobians.

``C = c · Σ_n J_nᵀ H_n J_n`` with ``H_n = diag(p_n) − p_n p_nᵀ`` (cross-entropy) or ``2 I`` (MSE)
and ``c = 1/M`` for reduction "mean" (M target positions or output elements) or 1 for "sum":
the GGN of ``loss_fn`` exactly as ``GGNOperator`` defines it. K backward passes per example
(vmapped, in chunks of bounded memory) instead of P products over the data: far cheaper when
the network's forward pass costs more than K·P (convolutions, attention), and no worse for an
MLP. Used for "full"; models whose output is not (n, K) (sequence outputs) use the GGN
operator instead.
"""

from __future__ import annotations

from typing import Any

import torch

from ..operators.distributed import all_reduce_sum
from ._model import ModelFunction
from .likelihood import Likelihood


def applies(function: ModelFunction, likelihood: Likelihood, data: Any, func: str) -> bool:
    """Whether the model's output on the first batch is (n, K) (class logits or targets)."""
    for inputs, _, _ in function.batches(data, func):
        output = function.outputs(inputs)
        return output.ndim == 2 or (likelihood.kind == "regression" and output.ndim >= 1)
    return False


def jacobian_ggn(
    function: ModelFunction, likelihood: Likelihood, data: Any, func: str
) -> torch.Tensor:
    """The GGN of ``loss_fn`` (P, P)."""
    size = function.num_params
    total = torch.zeros((size, size), dtype=function.dtype, device=function.device)
    for inputs, targets, count in function.batches(data, func):
        start = 0
        for output, jacobian in function.jacobians(inputs, count):
            part = targets[start : start + len(output)]
            start += len(output)
            total += _chunk(output, jacobian, part, likelihood)
    all_reduce_sum(total)  # each process holds a shard of the data, as for the operators
    if likelihood.reduction == "mean":
        total /= max(likelihood.num_targets, 1)
    return total


def _chunk(output, jacobian, targets, likelihood: Likelihood) -> torch.Tensor:
    if likelihood.kind == "regression":
        flat = jacobian.reshape(-1, jacobian.shape[-1])
        return 2 * flat.T @ flat
    keep = (targets.reshape(-1) != likelihood.ignore_index).to(output.dtype)
    probs = torch.softmax(output, dim=1) * keep[:, None]  # ignored positions count 0
    weighted = probs[:, :, None] * jacobian
    mean = weighted.sum(dim=1)  # Σ_k p_k J_k, (n, P)
    flat = jacobian.reshape(-1, jacobian.shape[-1])
    return flat.T @ weighted.reshape(-1, jacobian.shape[-1]) - mean.T @ mean
