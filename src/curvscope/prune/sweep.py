"""Accuracy and loss against sparsity: :func:`prune_sweep` prunes one model many ways."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import operators
from .._checks import type_error, value_error
from ..estimators._results import Result
from ..operators.data import check_data, iterate_batches, model_arguments
from ._validate import FUNC, METHODS
from .curvature import reuse_curvature
from .pruning import prune


@dataclass(frozen=True, eq=False)
class SweepPoint(Result):
    """One pruned model of a sweep: the method, the target and the achieved sparsity (overall
    and per pruned parameter), the loss on the pruning data, and on the test data the loss and
    the accuracy (None when the targets are not class indices)."""

    method: str
    sparsity: float
    achieved: float
    per_layer: dict[str, float]
    loss: float
    test_loss: float
    test_accuracy: float | None
    seconds: float
    status: str


@dataclass(frozen=True, eq=False)
class PruneSweep(Result):
    """What :func:`prune_sweep` returns: the dense model's numbers and one point per method
    and sparsity (in the order of ``methods``, then ``sparsities``)."""

    model: str
    num_pruned: int
    layers: tuple[str, ...]
    dense_loss: float
    dense_test_loss: float
    dense_test_accuracy: float | None
    points: tuple[SweepPoint, ...]
    curvature: str
    scope: str
    structure: str | None
    damping: float
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, the points as dicts."""
        out = super().to_dict()
        out["points"] = [point.to_dict() for point in self.points]
        return out

    def point(self, method: str, sparsity: float) -> SweepPoint:
        """The point of ``method`` at the target ``sparsity``."""
        for item in self.points:
            if item.method == method and abs(item.sparsity - sparsity) < 1e-12:
                return item
        raise KeyError(f"no point for method {method!r} at sparsity {sparsity}")


def evaluate(model: nn.Module, loss_fn: Any, data: Any) -> tuple[float, float | None]:
    """(mean loss, accuracy) of ``model`` on ``data``; accuracy is None unless the targets are
    integer class indices and the outputs have one score per class on their last dimension."""
    first = next(name for name, _ in model.named_parameters())
    loss = operators.HessianOperator(
        model, loss_fn, data, params=[first], check_deterministic=False
    ).loss()
    correct = total = 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in iterate_batches(data, device=device, max_batch_size=None, func=FUNC):
                args, kwargs = model_arguments(batch.inputs)
                output, targets = model(*args, **kwargs), batch.targets
                if targets.is_floating_point() or output.ndim != targets.ndim + 1:
                    return loss, None
                correct += int((output.argmax(dim=-1) == targets).sum())
                total += targets.numel()
    finally:
        model.train(was_training)
    return loss, correct / max(total, 1)


def prune_sweep(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    *,
    sparsities: Sequence[float] = (0.5, 0.7, 0.9),
    methods: Sequence[str] = METHODS,
    test_data: Any = None,
    curvature: str = "ggn",
    scope: str = "layer",
    damping: float = 0.01,
    structure: str | None = None,
    params: Sequence[str] | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> PruneSweep:
    """Prune ``model`` one-shot with every method at every sparsity (:func:`curvscope.prune`)
    and measure each pruned copy's loss on ``data`` and loss and accuracy on ``test_data``.

    Args:
        model, loss_fn, data: as for :func:`curvscope.prune` (``data`` is the calibration data).
        sparsities: target sparsities, each in [0, 1).
        methods: among "magnitude", "obd", "obs", "layer_obs".
        test_data: held-out batches for the accuracy (default: ``data`` itself).
        curvature, scope, damping, structure, params, seed: passed to :func:`curvscope.prune`.
        progress: called with a short description before each pruning (e.g. to advance a bar).

    Returns:
        PruneSweep with the dense numbers and one SweepPoint per method and sparsity. The
        curvature blocks and layer inputs are computed once and reused across sparsities (and
        between obd and obs), so a point's ``seconds`` counts them only where first computed.
    """
    func = "prune_sweep"
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Sequence):
        raise type_error(func, "sparsities", "a list of numbers in [0, 1)", sparsities)
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise type_error(func, "methods", f"a non-empty list from {list(METHODS)}", methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise value_error(func, "methods", f"names from {list(METHODS)}", unknown)
    test_data = data if test_data is None else test_data
    check_data(test_data, func)
    dense_loss, _ = evaluate(model, loss_fn, data)
    dense_test_loss, dense_accuracy = evaluate(model, loss_fn, test_data)
    options = {
        "scope": scope,
        "curvature": curvature,
        "damping": damping,
        "structure": structure,
        "params": params,
        "seed": seed,
    }
    with reuse_curvature():
        points, layers, num_pruned = _points(
            model, loss_fn, data, test_data, sparsities, methods, options, progress
        )
    return PruneSweep(
        type(model).__name__,
        num_pruned,
        layers,
        dense_loss,
        dense_test_loss,
        dense_accuracy,
        tuple(points),
        curvature,
        scope,
        structure,
        float(damping),
        seed,
    )


def _points(model, loss_fn, data, test_data, sparsities, methods, options, progress) -> tuple:
    points, layers, num_pruned = [], (), 0
    for method in methods:
        for sparsity in sparsities:
            if progress is not None:
                progress(f"{method} at {float(sparsity):.2f}")
            start = time.perf_counter()
            result = prune(model, loss_fn, data, sparsity=sparsity, method=method, **options)
            seconds = time.perf_counter() - start
            test_loss, accuracy = evaluate(result.model, loss_fn, test_data)
            layers = tuple(result.masks)
            num_pruned = sum(mask.numel() for mask in result.masks.values())
            points.append(
                SweepPoint(
                    method,
                    float(sparsity),
                    float(result.sparsity),
                    dict(result.sparsity.per_layer),
                    result.loss_after,
                    test_loss,
                    accuracy,
                    seconds,
                    result.status,
                )
            )
    return points, layers, num_pruned
