"""The likelihood a loss stands for, and its value and curvature scale at the MAP.

``nn.CrossEntropyLoss`` is the categorical likelihood (classification); ``nn.MSELoss`` the
Gaussian likelihood with noise σ (regression). The loss's reduction does not change the
posterior: the likelihood is per example (per position for sequence outputs).

The curvature operators give C, the curvature of ``loss_fn`` as it reduces. The curvature of the
summed negative log-likelihood is ``scale(σ) · C`` with

- cross-entropy: ``scale = M`` (reduction "mean", M the number of target positions) or 1 ("sum");
- MSE: ``loss = Σ (f - y)² / M`` has curvature ``(2/M) Σ JᵀJ`` while the Gaussian negative
  log-likelihood ``Σ ‖f - y‖² / (2σ²) + (M/2) log(2πσ²)`` has ``Σ JᵀJ / σ²``, so
  ``scale = M / (2σ²)`` ("mean", M the number of output elements) or ``1 / (2σ²)`` ("sum").

With one position per example, ``scale · C = N · C_mean``: the conventions of laplace-torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .._checks import value_error
from ..operators.distributed import all_reduce_sum
from ..operators.losses import resolve_loss
from ._model import ModelFunction

SUPPORTED = "nn.CrossEntropyLoss (classification) or nn.MSELoss (Gaussian regression)"


@dataclass(frozen=True)
class Likelihood:
    """What the evidence needs from the data at the MAP.

    Attributes:
        kind: "classification" or "regression".
        reduction: the loss's reduction, "mean" or "sum".
        num_examples: N.
        num_targets: M, target positions (classification) or output elements (regression).
        ignore_index: targets ignored by cross-entropy.
        log_likelihood_at_map: Σ log p(y | f(x; θ_MAP)) for classification; for regression
            the sum of squared errors Σ ‖f - y‖² (the log-likelihood depends on σ).
    """

    kind: str
    reduction: str
    num_examples: int
    num_targets: int
    ignore_index: int
    log_likelihood_at_map: float

    def curvature_scale(self, sigma_noise: float) -> float:
        """``scale`` with (curvature of the summed NLL) = scale · (curvature of loss_fn)."""
        count = self.num_targets if self.reduction == "mean" else 1
        if self.kind == "classification":
            return float(count)
        return count / (2.0 * sigma_noise**2)

    def log_likelihood(self, sigma_noise: float) -> float:
        """Σ_n log p(y_n | f(x_n; θ_MAP)), with the Gaussian normaliser for regression."""
        if self.kind == "classification":
            return self.log_likelihood_at_map
        sse, count = self.log_likelihood_at_map, self.num_targets
        return -sse / (2 * sigma_noise**2) - 0.5 * count * math.log(2 * math.pi * sigma_noise**2)


def likelihood_kind(loss_fn: Any, func: str) -> tuple[str, Any]:
    """("classification" | "regression", the loss spec); refuses other losses."""
    spec = resolve_loss(loss_fn, None, func)
    if spec.kind not in ("cross_entropy", "mse"):
        raise value_error(
            func,
            "loss_fn",
            SUPPORTED,
            loss_fn,
            "The Laplace approximation needs the likelihood the loss stands for; use one of "
            "these (mean or sum reduction).",
        )
    if spec.kind == "cross_entropy" and (spec.weight is not None or spec.label_smoothing):
        raise value_error(
            func,
            "loss_fn",
            "nn.CrossEntropyLoss without class weights or label smoothing (a likelihood)",
            loss_fn,
            "Pass nn.CrossEntropyLoss() with the reduction you trained with.",
        )
    return ("classification" if spec.kind == "cross_entropy" else "regression"), spec


def measure(function: ModelFunction, data: Any, kind: str, spec: Any, func: str) -> Likelihood:
    """One pass over ``data``: N, M and the log-likelihood (or squared error) at θ_MAP."""
    total, examples, targets_count = 0.0, 0, 0
    for inputs, targets, size in function.batches(data, func):
        output = function.outputs(inputs)
        examples += size
        if kind == "classification":
            targets_count += int((targets != spec.ignore_index).sum())
            nll = F.cross_entropy(output, targets, reduction="sum", ignore_index=spec.ignore_index)
            total -= float(nll)
        else:
            targets_count += output.numel()
            total += float(((output - targets.reshape(output.shape)) ** 2).sum())
    # under torch.distributed each process holds a shard: sum over processes, as the operators do
    summed = torch.tensor([total, examples, targets_count], dtype=torch.float64)
    total, examples, targets_count = all_reduce_sum(summed.to(function.device)).tolist()
    if examples == 0:
        raise value_error(func, "data", "at least one example", data, "The data is empty.")
    return Likelihood(
        kind, spec.reduction, int(examples), int(targets_count), spec.ignore_index, total
    )
