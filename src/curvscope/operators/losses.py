"""What the operators need to know about a loss: its reduction, its Hessian w.r.t. the model
output, and its predictive distribution.

Closed forms exist for cross-entropy (``nn.CrossEntropyLoss`` or ``F.cross_entropy`` with class
indices as targets) and mean squared error (``nn.MSELoss`` or ``F.mse_loss``); every other loss
goes through autograd, on the model output only (never through the network).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vmap

from .._checks import check_choice, type_error, value_error

_REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class LossSpec:
    """How a loss reduces and, where known, which closed form applies."""

    kind: str  # "cross_entropy", "mse" or "other"
    reduction: str  # "mean" or "sum"
    weight: torch.Tensor | None = None
    ignore_index: int = -100
    label_smoothing: float = 0.0


def resolve_loss(loss_fn: Any, reduction: str | None, func: str) -> LossSpec:
    """Read the reduction (from an nn loss module, else the ``reduction`` keyword, default mean)."""
    if not callable(loss_fn):
        raise type_error(
            func, "loss_fn", "a callable loss_fn(output, targets)", loss_fn, "Pass nn.MSELoss()."
        )
    if reduction is not None:
        check_choice(func, "reduction", reduction, _REDUCTIONS)
    module_reduction = None
    if isinstance(loss_fn, nn.Module):
        module_reduction = getattr(loss_fn, "reduction", None)
    if module_reduction is not None:
        if module_reduction not in _REDUCTIONS:
            raise value_error(
                func,
                "loss_fn",
                "a loss that reduces to a scalar (reduction 'mean' or 'sum')",
                f"reduction={module_reduction!r}",
                f"Construct it with reduction='mean' or 'sum', e.g. {type(loss_fn).__name__}().",
            )
        if reduction is not None and reduction != module_reduction:
            raise value_error(
                func,
                "reduction",
                f"{module_reduction!r} (the reduction of loss_fn) or None",
                reduction,
                "Leave reduction=None for nn loss modules: it is read from the module.",
            )
        reduction = module_reduction
    reduction = reduction or "mean"
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return LossSpec(
            "cross_entropy",
            reduction,
            loss_fn.weight,
            loss_fn.ignore_index,
            loss_fn.label_smoothing,
        )
    if isinstance(loss_fn, nn.MSELoss):
        return LossSpec("mse", reduction)
    if loss_fn is F.cross_entropy or loss_fn is F.mse_loss:
        if reduction != "mean":
            raise value_error(
                func,
                "reduction",
                f"'mean', the reduction of {loss_fn.__name__} called as loss_fn(output, targets)",
                reduction,
                "Pass nn.CrossEntropyLoss(reduction='sum') or nn.MSELoss(reduction='sum').",
            )
        return LossSpec("cross_entropy" if loss_fn is F.cross_entropy else "mse", "mean")
    return LossSpec("other", reduction)


def _closed_form_cross_entropy(spec: LossSpec, output: torch.Tensor, targets: Any) -> bool:
    return (
        spec.kind == "cross_entropy"
        and output.ndim >= 2
        and isinstance(targets, torch.Tensor)
        and not targets.is_floating_point()
        and (spec.weight is None or spec.label_smoothing == 0.0)
    )


def _cross_entropy_scale(spec: LossSpec, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-position factor: class weight (0 where ignored), over their sum for reduction mean."""
    keep = targets != spec.ignore_index
    scale = keep.to(dtype)
    if spec.weight is not None:
        scale = scale * spec.weight.to(dtype)[torch.where(keep, targets, 0)]
    return scale / scale.sum() if spec.reduction == "mean" else scale


def loss_hessian_matmat(
    spec: LossSpec, loss_fn: Callable, output: torch.Tensor, targets: Any, block: torch.Tensor
) -> torch.Tensor:
    """``(∂²loss/∂output²) U`` for a stack ``block`` of k output-shaped tangents (k, *output).

    Cross-entropy: per position ``s · (diag(p) - p pᵀ) u`` with ``p = softmax(output)`` and ``s``
    the reduction's weight; MSE: ``2u / output.numel()`` (mean) or ``2u`` (sum); else autograd.
    """
    if _closed_form_cross_entropy(spec, output, targets):
        probs = torch.softmax(output, dim=1)
        scale = _cross_entropy_scale(spec, targets, output.dtype).unsqueeze(1)
        weighted = probs * block
        return scale * (weighted - probs * weighted.sum(dim=2, keepdim=True))
    if spec.kind == "mse":
        factor = 2.0 / output.numel() if spec.reduction == "mean" else 2.0
        return factor * block
    loss_grad = grad(lambda out: loss_fn(out, targets))
    return vmap(lambda u: jvp(loss_grad, (output,), (u,))[1])(block)


def per_example_output_gradients(
    spec: LossSpec, loss_fn: Callable, output: torch.Tensor, targets: Any
) -> torch.Tensor:
    """``∂ℓ_n/∂output_n`` for each example, where ``ℓ_n = loss_fn`` on a batch of one: (n, ...).

    Closed forms: cross-entropy (one position per example, no class weights or smoothing)
    ``p - onehot(y)`` (0 where the target is ignored); MSE ``2 (output - y) / m`` with m the
    elements per example (1 for reduction "sum"). Otherwise vmap(grad) of the loss.
    """
    if spec.kind == "mse" and isinstance(targets, torch.Tensor) and targets.shape == output.shape:
        per_example = output[0].numel() if spec.reduction == "mean" else 1
        return 2.0 * (output - targets) / per_example
    if (
        _closed_form_cross_entropy(spec, output, targets)
        and output.ndim == 2
        and spec.weight is None
        and spec.label_smoothing == 0.0
    ):
        keep = targets != spec.ignore_index
        onehot = F.one_hot(torch.where(keep, targets, 0), output.shape[1]).to(output.dtype)
        return (torch.softmax(output, dim=1) - onehot) * keep.unsqueeze(1).to(output.dtype)

    def one(out: torch.Tensor, target: Any) -> torch.Tensor:
        return loss_fn(out.unsqueeze(0), _unsqueeze(target))

    return vmap(grad(one))(output, targets)


def _unsqueeze(target: Any) -> Any:
    if isinstance(target, torch.Tensor):
        return target.unsqueeze(0)
    if isinstance(target, dict):
        return {k: _unsqueeze(v) for k, v in target.items()}
    return type(target)(_unsqueeze(v) for v in target)


def sampled_output_gradients(
    spec: LossSpec, output: torch.Tensor, generator: torch.Generator, num_samples: int
) -> torch.Tensor:
    """Gradients of the negative log-likelihood w.r.t. the output at labels drawn from the model.

    Cross-entropy: ``y ~ Categorical(softmax(output))`` per position, gradient ``p - onehot(y)``.
    MSE (the Gaussian likelihood with variance 1/2): ``y ~ N(output, I/2)``, gradient
    ``2 (output - y)``. Samples are drawn on the CPU from ``generator``. Returns (S, *output).
    """
    if spec.kind == "cross_entropy":
        probs = torch.softmax(output.detach(), dim=1)
        classes = probs.shape[1]
        flat = probs.movedim(1, -1).reshape(-1, classes).to("cpu", torch.float64)
        labels = torch.multinomial(flat, num_samples, replacement=True, generator=generator)
        onehot = F.one_hot(labels.T, classes).to(output.dtype)  # (S, positions, C)
        moved_shape = (num_samples, *probs.movedim(1, -1).shape)
        onehot = onehot.reshape(moved_shape).movedim(-1, 2).to(output.device)
        return probs.unsqueeze(0) - onehot
    noise = torch.randn((num_samples, *output.shape), generator=generator, dtype=torch.float64)
    noise = noise.to(dtype=output.dtype, device=output.device)
    return -2.0 * math.sqrt(0.5) * noise  # 2 (output - y) with y = output + noise / sqrt(2)


def per_example_scale(spec: LossSpec, output: torch.Tensor) -> float:
    """``c`` with per-example loss = c · negative log-likelihood: 1/positions or 1/elements."""
    if spec.reduction == "sum":
        return 1.0
    per_example = output[0]
    if spec.kind == "cross_entropy":
        return 1.0 / max(per_example.numel() // per_example.shape[0], 1)
    return 1.0 / per_example.numel()
