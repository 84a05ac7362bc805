"""Predictive distributions of a Laplace approximation, and calibration metrics.

With μ = f(x; θ_MAP), J the Jacobian of f at θ_MAP and Λ the posterior precision:

- "probit" (classification): ``p = softmax(μ / sqrt(1 + π/8 · diag(J Λ⁻¹ Jᵀ)))`` (MacKay 1992;
  the multi-class form of laplace-torch); for regression the closed form of the linearised
  model: mean μ, variance ``diag(J Λ⁻¹ Jᵀ) + σ²``;
- "glm": samples of the linearised model ``f(x; θ_MAP) + J (θ − θ_MAP)``, θ from the posterior
  (Immer, Korzepa & Bauer 2021, "Improving predictions of Bayesian neural nets via local
  linearization");
- "mc": samples of the network itself at posterior samples of θ (never written to the model).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ._model import ModelFunction

METHODS = ("probit", "glm", "mc")


def linearised(
    function: ModelFunction, solve: Callable[[torch.Tensor], torch.Tensor], inputs: Any, size: int
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(μ (n, K), diag(J Λ⁻¹ Jᵀ) (n, K), the Jacobian chunks (n_i, K, P)) on one batch."""
    means, variances, jacobians = [], [], []
    for output, jacobian in function.jacobians(inputs, size):
        count, width, params = jacobian.shape
        flat = jacobian.reshape(count * width, params)
        solved = solve(flat.T.contiguous())  # Λ⁻¹ Jᵀ, (P, n K)
        variances.append((flat * solved.T).sum(dim=1).reshape(count, width))
        means.append(output)
        jacobians.append(jacobian)
    return torch.cat(means), torch.cat(variances).clamp_min(0), jacobians


def probit(mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """``softmax(μ / sqrt(1 + π/8 · var))`` over the last dimension."""
    return torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * variance), dim=-1)


def glm_samples(mean: torch.Tensor, jacobians: list[torch.Tensor], deltas: torch.Tensor):
    """``f + J Δ`` for parameter offsets Δ (P, S): (S, n, K)."""
    pieces = [torch.einsum("nkp,ps->snk", jac, deltas) for jac in jacobians]
    return mean.unsqueeze(0) + torch.cat(pieces, dim=1)


def network_samples(
    function: ModelFunction, inputs: Any, thetas: torch.Tensor, size: int
) -> torch.Tensor:
    """The network's flattened outputs at each parameter vector θ_s (S, P): (S, n, K)."""
    return torch.stack([function.outputs(inputs, theta).reshape(size, -1) for theta in thetas])


def summarise_samples(samples: torch.Tensor, kind: str) -> Any:
    """Classification: mean of the softmax over samples; regression: (mean, variance)."""
    if kind == "classification":
        return torch.softmax(samples, dim=-1).mean(dim=0)
    return samples.mean(dim=0), samples.var(dim=0, unbiased=False)


def closed_form(kind: str, mean: torch.Tensor, variance: torch.Tensor) -> Any:
    """Probit probabilities (classification) or (mean, f-variance) (regression)."""
    if kind == "classification":
        return probit(mean, variance)
    return mean, variance


def nll_sum(kind: str, sigma: float, prediction: Any, targets: torch.Tensor) -> float:
    """Summed NLL of a prediction: per example (classification) or output element."""
    if kind == "classification":
        return negative_log_likelihood(prediction, targets) * len(targets)
    mean, variance = prediction
    return gaussian_nll(mean, variance + sigma**2, targets) * mean.numel()


def validation_nll(
    function: ModelFunction,
    structure: Any,
    val_data: Any,
    priors: list[torch.Tensor],
    offsets: list[torch.Tensor],
    *,
    kind: str,
    scale: float,
    sigma: float,
    func: str,
) -> list[float]:
    """Mean validation NLL for each (P,) prior vector: closed form, or "glm" with ``offsets``
    (one (P, S) sample block per prior). The Jacobians of each chunk serve every prior."""
    totals, count = np.zeros(len(priors)), 0
    for inputs, targets, size in function.batches(val_data, func):
        start = 0
        for output, jacobian in function.jacobians(inputs, size):
            part = targets[start : start + len(output)]
            start += len(output)
            variance_of = structure.variance_of(jacobian.reshape(-1, function.num_params))
            for index, prior in enumerate(priors):
                if offsets:
                    samples = glm_samples(output, [jacobian], offsets[index])
                    prediction = summarise_samples(samples, kind)
                else:
                    variance = variance_of(scale, prior).reshape(output.shape)
                    prediction = closed_form(kind, output, variance)
                totals[index] += nll_sum(kind, sigma, prediction, part)
        count += size if kind == "classification" else targets.numel()
    return list(totals / max(count, 1))


# -- calibration --------------------------------------------------------------------------------
def negative_log_likelihood(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean ``-log p(y)`` of predicted class probabilities (N, C)."""
    picked = probs.gather(1, targets.reshape(-1, 1)).clamp_min(1e-300)
    return float(-picked.log().mean())


def gaussian_nll(mean: torch.Tensor, variance: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean Gaussian negative log-likelihood per output element."""
    targets = targets.reshape(mean.shape)
    terms = 0.5 * (torch.log(2 * math.pi * variance) + (targets - mean) ** 2 / variance)
    return float(terms.mean())


def reliability(probs: torch.Tensor, targets: torch.Tensor, *, bins: int = 10) -> dict[str, Any]:
    """Accuracy, NLL, the expected calibration error and the reliability diagram's bins.

    ECE = Σ_b (n_b / N) |accuracy_b − confidence_b| over ``bins`` equal-width confidence bins
    (Guo et al. 2017, "On calibration of modern neural networks").
    """
    probs = probs.detach().double().cpu()
    targets = targets.detach().reshape(-1).cpu()
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == targets).double()
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence.numpy(), edges[1:-1]), 0, bins - 1)
    counts, accuracy, mean_confidence, ece = [], [], [], 0.0
    for b in range(bins):
        mask = torch.as_tensor(index == b)
        count = int(mask.sum())
        counts.append(count)
        acc = float(correct[mask].mean()) if count else None
        conf = float(confidence[mask].mean()) if count else None
        accuracy.append(acc)
        mean_confidence.append(conf)
        if count:
            ece += count / len(targets) * abs(acc - conf)
    return {
        "accuracy": float(correct.mean()),
        "nll": negative_log_likelihood(probs, targets),
        "ece": ece,
        "bin_edges": edges.tolist(),
        "bin_counts": counts,
        "bin_accuracy": accuracy,
        "bin_confidence": mean_confidence,
    }
