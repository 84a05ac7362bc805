"""``curvscope.prune``: one-shot magnitude, OBD, OBS and layer-wise OBS pruning."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .. import operators
from .._progress import progress_bar
from ._validate import Layer, check_arguments, select_layers
from .methods import RUNNERS, Job, removals
from .result import PruneResult, Sparsity


def prune(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    *,
    sparsity: float,
    method: str = "obs",
    scope: str = "layer",
    curvature: str = "ggn",
    damping: float = 0.01,
    structure: str | None = None,
    params: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> PruneResult:
    """Prune a trained model one-shot to a sparsity, by magnitude or by the curvature of the loss.

    - ``"magnitude"``: remove the smallest |w|.
    - ``"obd"`` (LeCun, Denker & Solla, 1990, "Optimal Brain Damage"): saliency ½ w_q² C_qq, no
      update of the other weights.
    - ``"obs"`` (Hassibi & Stork, 1993, "Optimal Brain Surgeon"; WoodFisher, Singh & Alistarh,
      2020): saliency w_q² / (2 [C⁻¹]_qq) and the update δw = −(w_q / [C⁻¹]_qq) C⁻¹ e_q, weights
      removed greedily (small blocks of 8 for large blocks) with the inverse downdated after
      each removal; C is the layer's dense curvature block for layers of at most 4,096 weights,
      block-diagonal (blocks of 256 consecutive weights) for larger ones, and with
      ``curvature="diagonal"`` OBS equals OBD on the damped diagonal.
    - ``"layer_obs"`` (Optimal Brain Compression and SparseGPT, Frantar & Alistarh 2022, 2023):
      per Linear/Conv layer, minimise ‖W X − Ŵ X‖² over the inputs X that ``data`` feeds the
      layer (H = X Xᵀ), row by row with the OBS update; no curvature of the loss is used.

    C is the curvature of the mean loss over ``data`` restricted to one pruned layer (the other
    parameters held fixed), damped as C + damping · mean(diag C) · I. The pruned parameters are
    the weights of Linear and Conv layers unless ``params`` names others; each is seen as a
    matrix (output rows, flattened inputs), which is what "n:m" and "channel" refer to.

    Args:
        model: the trained network; never modified.
        loss_fn: ``loss_fn(output, targets) -> scalar`` (reduction "mean" or "sum").
        data: an iterable of ``(inputs, targets)`` batches, or one batch; for "layer_obs", the
            calibration inputs.
        sparsity: fraction of zeros among the pruned parameters, in [0, 1) (n / m for "n:m").
        method: "magnitude", "obd", "obs" or "layer_obs".
        scope: "layer" (every layer reaches the sparsity, within one weight) or "global" (one
            threshold over all pruned layers; for layer_obs, on each layer's error relative to
            its output energy ‖W X‖²).
        curvature: "ggn", "fisher" (empirical), "hessian", "kfac" or "diagonal" (GGN diagonal),
            for obd and obs.
        damping: relative damping (>= 0) of the curvature, or of H for layer_obs.
        structure: None (unstructured), "n:m" (n zeros in every m consecutive weights of a row,
            e.g. "2:4"), or "channel" (whole output rows/channels: ranked by the L1 norm, the
            row sum of OBD saliencies, the joint OBS saliency ½ w_rᵀ([C⁻¹]_rr)⁻¹w_r with the
            joint update, or the layer error w_rᵀ H w_r; per layer within one row).
        params: names of the parameters to prune (default: Linear and Conv weights).
        seed: seed of any random estimate (the GGN diagonal of very large layers).
        progress: show a progress bar on stderr.

    Returns:
        PruneResult with ``masks`` (True = kept), ``model`` (a pruned copy), ``sparsity``,
        ``saliency``, ``loss_before``, ``loss_after`` and ``status``.

    Example:
        >>> import torch, curvscope
        >>> model = torch.nn.Linear(4, 1, bias=False).double()
        >>> x = torch.eye(4, dtype=torch.float64)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, -3.0, 0.5, 2.0]]))
        >>> result = curvscope.prune(model, torch.nn.MSELoss(), (x, model(x).detach()),
        ...                          sparsity=0.5, method="magnitude")
        >>> result.masks["weight"].tolist()
        [[False, True, False, True]]
    """
    start = time.perf_counter()
    options = {
        "sparsity": sparsity,
        "method": method,
        "scope": scope,
        "curvature": curvature,
        "damping": damping,
        "structure": structure,
        "seed": seed,
        "progress": progress,
    }
    sparsity, shape = check_arguments(model, loss_fn, data, options)
    layers = select_layers(model, params, shape, method)
    named = dict(model.named_parameters())
    weights = {
        layer.name: named[layer.name].detach().to(torch.float64).reshape(layer.rows, layer.cols)
        for layer in layers
    }
    loss_before = _loss(model, loss_fn, data, layers)
    with progress_bar(progress, f"prune ({method})", sum(removals(layers, sparsity, shape))) as bar:
        job = Job(
            model,
            loss_fn,
            data,
            layers,
            weights,
            sparsity,
            scope,
            shape,
            curvature,
            damping,
            seed,
            bar.advance,
        )
        new, masks, saliency = RUNNERS[method](job)
    pruned = _write(model, layers, new, masks)
    zeros = {name: int((~mask).sum()) for name, mask in masks.items()}
    total = sum(layer.numel for layer in layers)
    achieved = Sparsity(
        sum(zeros.values()) / total, {l.name: zeros[l.name] / l.numel for l in layers}
    )
    return PruneResult(
        masks={l.name: masks[l.name].reshape(l.shape).to(named[l.name].device) for l in layers},
        model=pruned,
        sparsity=achieved,
        saliency={
            l.name: saliency[l.name].reshape(l.shape).to(named[l.name].dtype) for l in layers
        },
        loss_before=loss_before,
        loss_after=_loss(pruned, loss_fn, data, layers),
        method=method,
        curvature=curvature if method in ("obd", "obs") else "-",
        scope=scope,
        structure=shape.text,
        seconds=time.perf_counter() - start,
        status="; ".join(job.notes) or "ok",
    )


def _write(
    model: nn.Module,
    layers: list[Layer],
    new: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
) -> nn.Module:
    """A deep copy of ``model`` with the new weights, exactly zero where the masks say so."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for layer in layers:
            parameter = pruned.get_parameter(layer.name)
            value = new[layer.name].reshape(layer.shape).to(parameter.device, parameter.dtype)
            keep = masks[layer.name].reshape(layer.shape).to(parameter.device)
            parameter.copy_(value.masked_fill(~keep, 0.0))
    return pruned


def _loss(model: nn.Module, loss_fn: Any, data: Any, layers: list[Layer]) -> float:
    """The full-data loss (through the operators' data layer, in eval mode)."""
    op = operators.HessianOperator(
        model, loss_fn, data, params=[layers[0].name], check_deterministic=False
    )
    return op.loss()
