"""What the operators need to know about a loss: its summed form, its normaliser, and products
with its Hessian and its per-example gradients with respect to the model output.

Every operator works with the *summed* loss of a batch and divides once by the normaliser of the
whole dataset, so that the result is the curvature of the dataset loss exactly as torch defines
it, whatever the batching:

    L = (Σ_b S_b) / Z        (reduction "mean"),      L = Σ_b S_b      (reduction "sum"),

with ``S_b`` the loss of batch b with reduction "sum" and ``Z`` the total over the data of what
the loss averages over (counted once, from the targets, before the first product):

- ``CrossEntropyLoss`` / ``NLLLoss`` with class indices: the sum of the class weights of the
  targets that are not ``ignore_index`` (their number without weights), as torch's weighted
  mean; with class probabilities, the number of positions (N, or N·d1·d2… for (N, C, d1, …)).
- elementwise losses (``MSELoss``, ``L1Loss``, ``HuberLoss``, ``SmoothL1Loss``,
  ``SoftMarginLoss``, ``BCELoss``, ``BCEWithLogitsLoss``, ``PoissonNLLLoss``,
  ``HingeEmbeddingLoss``, ``KLDivLoss(reduction="mean")``): the number of target elements.
- per-example losses (``MultiLabelSoftMarginLoss``, ``MultiMarginLoss``,
  ``MultiLabelMarginLoss``, ``KLDivLoss(reduction="batchmean")``): the number of examples.
- a plain callable with reduction "mean": it is taken to average over examples, so
  ``S_b = n_b · loss_fn(output, targets)`` and ``Z = N``.

A plain callable's reduction is never guessed silently: without ``reduction=`` it is detected on
the first batch of at least two examples, by comparing the loss on the batch with its loss on
the two halves (sum: L = L₁ + L₂; mean: L = (n₁L₁ + n₂L₂)/n); when neither holds, or no batch has
two examples, the operator asks for ``reduction=``.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, type_error, value_error

_REDUCTIONS = ("mean", "sum")

_ELEMENTWISE = (
    nn.MSELoss,
    nn.L1Loss,
    nn.HuberLoss,
    nn.SmoothL1Loss,
    nn.SoftMarginLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.PoissonNLLLoss,
    nn.HingeEmbeddingLoss,
)
_PER_EXAMPLE = (nn.MultiLabelSoftMarginLoss, nn.MultiMarginLoss, nn.MultiLabelMarginLoss)


@dataclass(frozen=True)
class LossSpec:
    """How a loss reduces, how to count its normaliser, and which closed form applies.

    Attributes:
        kind: "cross_entropy", "nll", "mse", "elementwise", "per_example" or "callable".
        reduction: "mean" or "sum" (of the loss as the user gave it).
        summed: ``(output, targets, size) -> S_b``, the summed loss of a batch of ``size``.
        name: how messages name the loss.
    """

    kind: str
    reduction: str
    summed: Callable[[Any, Any, int], torch.Tensor]
    name: str
    weight: torch.Tensor | None = None
    ignore_index: int = -100
    label_smoothing: float = 0.0
    probed: bool = False  # a callable whose reduction is still to be detected

    @property
    def samplable(self) -> bool:
        """Whether labels can be drawn from the model's predictive (Monte Carlo Fisher): MSE,
        or cross-entropy without class weights or label smoothing."""
        plain_ce = self.weight is None and self.label_smoothing == 0.0
        return self.kind == "mse" or (self.kind == "cross_entropy" and plain_ce)

    def normaliser(self, targets: Any, size: int) -> float:
        """What the loss averages over in a batch of ``size`` examples with ``targets``."""
        if self.kind in ("cross_entropy", "nll") and isinstance(targets, torch.Tensor):
            if targets.is_floating_point():  # class probabilities (N, C, ...)
                return float(targets.numel() // targets.shape[1]) if targets.ndim > 1 else 1.0
            keep = targets != self.ignore_index
            if self.weight is None:
                return float(keep.sum())
            weights = self.weight.to(targets.device)[torch.where(keep, targets, 0)]
            return float((weights * keep).sum())
        if self.kind in ("mse", "elementwise") and isinstance(targets, torch.Tensor):
            return float(targets.numel())
        return float(size)


def _summed_module(loss_fn: nn.Module, reduction: str) -> Callable[[Any, Any, int], torch.Tensor]:
    if reduction == "sum":
        return lambda output, targets, size: loss_fn(output, targets)
    summed = copy.copy(loss_fn)  # shallow: shares the weight buffers, reduces by sum
    summed.reduction = "sum"
    return lambda output, targets, size: summed(output, targets)


def _callable_summed(loss_fn: Callable, reduction: str) -> Callable[[Any, Any, int], torch.Tensor]:
    if reduction == "sum":
        return lambda output, targets, size: loss_fn(output, targets)
    return lambda output, targets, size: size * loss_fn(output, targets)


def suggest_loss(targets: Any) -> str:
    """The loss that fits ``targets``: cross-entropy for class indices, else MSE."""
    if isinstance(targets, torch.Tensor) and not targets.is_floating_point():
        return "nn.CrossEntropyLoss()"
    return "nn.MSELoss()"


def _module_reduction(loss_fn: nn.Module, reduction: str | None, func: str) -> str:
    module_reduction = loss_fn.reduction
    allowed = _REDUCTIONS + (("batchmean",) if isinstance(loss_fn, nn.KLDivLoss) else ())
    if module_reduction not in allowed:
        raise value_error(
            func,
            "loss_fn",
            "a loss that reduces to a scalar (reduction 'mean' or 'sum')",
            f"reduction={module_reduction!r}",
            f"Construct it with reduction='mean' or 'sum', e.g. {type(loss_fn).__name__}().",
        )
    module_reduction = "mean" if module_reduction == "batchmean" else module_reduction
    if reduction is not None and reduction != module_reduction:
        raise value_error(
            func,
            "reduction",
            f"{module_reduction!r} (the reduction of loss_fn) or None",
            reduction,
            "Leave reduction=None for nn loss modules: it is read from the module.",
        )
    return module_reduction


def resolve_loss(loss_fn: Any, reduction: str | None, func: str, targets: Any = None) -> LossSpec:
    """Read how ``loss_fn`` reduces (an nn loss module: from the module; F.cross_entropy and
    F.mse_loss: mean; a callable: ``reduction``, or detected on the first batch)."""
    if not callable(loss_fn) or isinstance(loss_fn, type):
        fix = f"Pass a loss module such as {suggest_loss(targets)}"
        if isinstance(loss_fn, type):
            fix = f"Pass an instance, {loss_fn.__name__}(), not the class"
        raise type_error(func, "loss_fn", "a callable loss_fn(output, targets)", loss_fn, fix + ".")
    if reduction is not None:
        check_choice(func, "reduction", reduction, _REDUCTIONS)
    name = (
        type(loss_fn).__name__
        if isinstance(loss_fn, nn.Module)
        else getattr(loss_fn, "__name__", type(loss_fn).__name__)
    )
    if isinstance(loss_fn, nn.Module) and isinstance(getattr(loss_fn, "reduction", None), str):
        reduction = _module_reduction(loss_fn, reduction, func)
        summed = _summed_module(loss_fn, reduction)
        if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
            kind = "cross_entropy" if isinstance(loss_fn, nn.CrossEntropyLoss) else "nll"
            smoothing = getattr(loss_fn, "label_smoothing", 0.0)
            return LossSpec(
                kind, reduction, summed, name, loss_fn.weight, loss_fn.ignore_index, smoothing
            )
        if isinstance(loss_fn, nn.MSELoss):
            return LossSpec("mse", reduction, summed, name)
        if isinstance(loss_fn, _ELEMENTWISE):
            return LossSpec("elementwise", reduction, summed, name)
        if isinstance(loss_fn, nn.KLDivLoss):
            kind = "per_example" if loss_fn.reduction == "batchmean" else "elementwise"
            return LossSpec(kind, reduction, summed, name)
        if isinstance(loss_fn, _PER_EXAMPLE):
            return LossSpec("per_example", reduction, summed, name)
    if loss_fn is F.cross_entropy or loss_fn is F.mse_loss:
        if reduction not in (None, "mean"):
            raise value_error(
                func,
                "reduction",
                f"'mean', the reduction of {loss_fn.__name__} called as loss_fn(output, targets)",
                reduction,
                "Pass nn.CrossEntropyLoss(reduction='sum') or nn.MSELoss(reduction='sum').",
            )
        partial = functools.partial(loss_fn, reduction="sum")
        kind = "cross_entropy" if loss_fn is F.cross_entropy else "mse"
        return LossSpec(kind, "mean", lambda output, targets, size: partial(output, targets), name)
    if reduction is None:  # a callable: detected on the first batch (see the module docstring)
        return LossSpec("callable", "mean", _callable_summed(loss_fn, "mean"), name, probed=True)
    return LossSpec("callable", reduction, _callable_summed(loss_fn, reduction), name)


def detect_reduction(
    spec: LossSpec, loss_fn: Callable, output: torch.Tensor, targets: Any, size: int, func: str
) -> LossSpec | None:
    """Decide sum or mean for a callable from its loss on a batch and on its two halves; None
    when the batch has fewer than two examples. Raises when neither form fits."""
    from .data import slice_examples, tensor_leaves  # local: data imports nothing from here

    if size < 2:
        return None
    half = size // 2

    def part(start: int, stop: int) -> float:
        pieces = slice_examples((output, targets), start, stop)
        return float(loss_fn(*pieces))

    with torch.no_grad():
        whole, first, second = float(loss_fn(output, targets)), part(0, half), part(half, size)
    as_sum, as_mean = first + second, (half * first + (size - half) * second) / size
    scale = max(abs(whole), abs(as_sum), abs(as_mean), 1e-30)
    low = any(t.dtype != torch.float64 for t in tensor_leaves(output) if t.is_floating_point())
    tol = 1e-4 if low else 1e-9
    is_sum = abs(whole - as_sum) <= tol * scale
    is_mean = abs(whole - as_mean) <= tol * scale
    if is_sum != is_mean:
        reduction = "sum" if is_sum else "mean"
        return LossSpec("callable", reduction, _callable_summed(loss_fn, reduction), spec.name)
    raise value_error(
        func,
        "reduction",
        f"'mean' or 'sum' for the plain callable loss_fn {spec.name}",
        None,
        f"Its value on a batch of {size} ({whole:.6g}) is neither the sum ({as_sum:.6g}) nor the "
        f"mean ({as_mean:.6g}) of its values on the two halves, so curvscope cannot tell how it "
        "reduces. Pass reduction='sum' or reduction='mean' (the average over examples).",
    )


def undetected_reduction(spec: LossSpec, func: str) -> ValueError:
    """The error when no batch had two examples to detect a callable's reduction."""
    return value_error(
        func,
        "reduction",
        f"'mean' or 'sum' for the plain callable loss_fn {spec.name}",
        None,
        "No batch holds two examples to tell whether it sums or averages. Pass "
        "reduction='sum' or reduction='mean' (the average over examples).",
    )


def _cross_entropy_closed_form(spec: LossSpec, output: torch.Tensor, targets: Any) -> bool:
    return (
        spec.kind == "cross_entropy"
        and output.ndim >= 2
        and isinstance(targets, torch.Tensor)
        and not targets.is_floating_point()
    )


def _cross_entropy_scale(spec: LossSpec, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per position: the factor of ``diag(p) - p pᵀ`` in the summed loss's Hessian,
    ``keep · ((1 - ε) w_y + ε mean_c w_c)`` (1 - ε + ε = 1 without class weights)."""
    keep = targets != spec.ignore_index
    scale = keep.to(dtype)
    if spec.weight is None:
        return scale
    weight = spec.weight.to(dtype=dtype, device=targets.device)
    eps = spec.label_smoothing
    return scale * ((1 - eps) * weight[torch.where(keep, targets, 0)] + eps * weight.mean())


def loss_hessian_matmat(
    spec: LossSpec, output: torch.Tensor, targets: Any, size: int, block: torch.Tensor
) -> torch.Tensor | None:
    """Closed-form ``(∂²S_b/∂output²) U`` for a stack ``block`` (k, *output), or None.

    Cross-entropy with class indices (any class weights, ignore_index, label smoothing):
    per position ``s · (diag(p) - p pᵀ) u`` with ``p = softmax(output)``; MSE: ``2u``.
    """
    if _cross_entropy_closed_form(spec, output, targets):
        probs = torch.softmax(output, dim=1)
        scale = _cross_entropy_scale(spec, targets, output.dtype).unsqueeze(1)
        weighted = probs * block
        return scale * (weighted - probs * weighted.sum(dim=2, keepdim=True))
    if spec.kind == "mse":
        return 2.0 * block
    return None


def output_gradients(spec: LossSpec, output: torch.Tensor, targets: Any, size: int) -> torch.Tensor:
    """``∂S_b/∂output``: row n is the gradient of example n's summed loss terms (the summed
    loss is a sum over examples). Closed forms for MSE and plain cross-entropy; else autograd."""
    if spec.kind == "mse" and isinstance(targets, torch.Tensor) and targets.shape == output.shape:
        return 2.0 * (output - targets)
    plain = spec.weight is None and spec.label_smoothing == 0.0
    if _cross_entropy_closed_form(spec, output, targets) and plain:
        keep = targets != spec.ignore_index
        onehot = F.one_hot(torch.where(keep, targets, 0), output.shape[1]).movedim(-1, 1)
        probs = torch.softmax(output, dim=1)
        return (probs - onehot.to(output.dtype)) * keep.unsqueeze(1).to(output.dtype)
    leaf = output.detach().requires_grad_(True)
    with torch.enable_grad():
        return torch.autograd.grad(spec.summed(leaf, targets, size), leaf)[0]


def sampled_output_gradients(
    spec: LossSpec,
    output: torch.Tensor,
    targets: Any,
    generator: torch.Generator,
    num_samples: int,
) -> torch.Tensor:
    """Gradients of the summed negative log-likelihood w.r.t. the output at labels drawn from
    the model, (S, *output).

    Cross-entropy: ``y ~ Categorical(softmax(output))`` per position, gradient ``p - onehot(y)``
    (0 where the target is ignored). MSE (the Gaussian likelihood with variance 1/2):
    ``y ~ N(output, I/2)``, gradient ``2 (output - y)``. Samples are drawn on the CPU.
    """
    if spec.kind == "cross_entropy":
        probs = torch.softmax(output.detach(), dim=1)
        classes = probs.shape[1]
        flat = probs.movedim(1, -1).reshape(-1, classes).to("cpu", torch.float64)
        labels = torch.multinomial(flat, num_samples, replacement=True, generator=generator)
        onehot = F.one_hot(labels.T, classes).to(output.dtype)  # (S, positions, C)
        moved_shape = (num_samples, *probs.movedim(1, -1).shape)
        onehot = onehot.reshape(moved_shape).movedim(-1, 2).to(output.device)
        gradients = probs.unsqueeze(0) - onehot
        if isinstance(targets, torch.Tensor) and not targets.is_floating_point():
            keep = (targets != spec.ignore_index).unsqueeze(1).to(output.dtype)
            gradients = gradients * keep
        return gradients
    noise = torch.randn((num_samples, *output.shape), generator=generator, dtype=torch.float64)
    noise = noise.to(dtype=output.dtype, device=output.device)
    return -math.sqrt(2.0) * noise  # 2 (output - y) with y = output + noise / sqrt(2)
