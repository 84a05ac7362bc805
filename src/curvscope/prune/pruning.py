"""``curvscope.prune``: one-shot magnitude, OBD, OBS and layer-wise OBS pruning."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import operators
from . import layer_obs as layerwise
from ._progress import Bar
from ._validate import Layer, Structure, check_arguments, select_layers
from .curvature import LayerCurvature, layer_curvatures, require_kfac
from .masks import count, rows_to_masks, select, select_rows
from .obs import (
    GreedyOBS,
    damped_inverse,
    joint_removal,
    relative_damping,
    row_saliency,
    run_greedy,
)
from .result import PruneResult, Sparsity

#: Layers with at most this many pruned weights get one dense curvature block (dense OBS);
#: larger ones a block-diagonal one with blocks of ``BLOCK_SIZE`` consecutive weights.
MAX_DENSE = 4096
BLOCK_SIZE = 256


@dataclass
class _Job:
    """Everything one call works on; weights are (rows, cols) float64 copies."""

    model: nn.Module
    loss_fn: Any
    data: Any
    layers: list[Layer]
    weights: dict[str, torch.Tensor]
    sparsity: float
    scope: str
    structure: Structure
    curvature: str
    damping: float
    seed: int
    tick: Callable[[int], None]
    notes: list[str] = field(default_factory=list)

    def removals(self) -> list[int]:
        return _removals(self.layers, self.sparsity, self.structure)


def _removals(layers: list[Layer], sparsity: float, structure: Structure) -> list[int]:
    """Weights removed per layer (scope "layer"; n:m removes exactly n of every m)."""
    if structure.kind == "n:m":
        return [layer.numel * structure.n // structure.m for layer in layers]
    return [count(sparsity, layer.numel) for layer in layers]


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
    if method in ("obd", "obs") and curvature == "kfac":
        require_kfac()
    named = dict(model.named_parameters())
    weights = {
        layer.name: named[layer.name].detach().to(torch.float64).reshape(layer.rows, layer.cols)
        for layer in layers
    }
    loss_before = _loss(model, loss_fn, data, layers)
    with Bar(progress, f"prune ({method})", sum(_removals(layers, sparsity, shape))) as bar:
        job = _Job(
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
        new, masks, saliency = _METHODS[method](job)
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


# -- the methods: each returns (new weights, masks, saliencies), all (rows, cols) ---------------
Outcome = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]


def _by_scores(job: _Job, scores: dict[str, torch.Tensor]) -> Outcome:
    """Remove by ``scores`` without updating the other weights."""
    masks = select(scores, job.layers, job.sparsity, job.scope, job.structure)
    masks = {name: mask.reshape(job.weights[name].shape) for name, mask in masks.items()}
    job.tick(sum(int((~mask).sum()) for mask in masks.values()))
    new = {name: job.weights[name] * masks[name] for name in masks}
    return new, masks, scores


def _magnitude(job: _Job) -> Outcome:
    return _by_scores(job, {name: w.abs() for name, w in job.weights.items()})


def _diagonals(job: _Job) -> dict[str, torch.Tensor]:
    curvatures = layer_curvatures(
        job.curvature, job.model, job.loss_fn, job.data, job.layers, job.seed
    )
    return {
        layer.name: curvatures[layer.name].diagonal(job.seed).reshape(layer.rows, layer.cols)
        for layer in job.layers
    }


def _obd(job: _Job) -> Outcome:
    diagonals = _diagonals(job)
    return _by_scores(job, {n: 0.5 * w**2 * diagonals[n] for n, w in job.weights.items()})


def _obs(job: _Job) -> Outcome:
    if job.curvature == "diagonal":  # a diagonal C⁻¹ moves no other weight: OBD on C + λ I
        scores = {}
        for name, diag in _diagonals(job).items():
            lam = job.damping * abs(float(diag.mean()))
            scores[name] = 0.5 * job.weights[name] ** 2 * (diag + lam)
        return _by_scores(job, scores)
    curvatures = layer_curvatures(
        job.curvature, job.model, job.loss_fn, job.data, job.layers, job.seed
    )
    engines = [_engine(job, layer, curvatures[layer.name]) for layer in job.layers]
    saliency = {
        layer.name: e.initial_saliency.reshape(-1)[: layer.numel].reshape(layer.rows, layer.cols)
        for layer, e in zip(job.layers, engines, strict=True)
    }
    if job.structure.kind == "channel":
        return _obs_channels(job, engines, saliency)
    counts = job.removals()
    run_greedy(
        engines,
        sum(counts) if job.scope == "global" and not job.structure.kind else counts,
        job.tick,
    )
    new, masks = {}, {}
    for layer, engine in zip(job.layers, engines, strict=True):
        new[layer.name] = engine.w.reshape(-1)[: layer.numel].reshape(layer.rows, layer.cols)
        masks[layer.name] = ~engine.removed.reshape(-1)[: layer.numel].reshape(layer.rows, -1)
        if engine.broken:
            job.notes.append(
                f"{engine.broken} weights of {layer.name} removed without update "
                "(the inverse broke down)"
            )
    return new, masks, saliency


def _engine(job: _Job, layer: Layer, curvature: LayerCurvature) -> GreedyOBS:
    """A greedy OBS engine on the layer: one dense group, or blocks of BLOCK_SIZE weights."""
    weight = job.weights[layer.name].reshape(-1)
    n_of_m = (job.structure.n, job.structure.m) if job.structure.kind == "n:m" else None
    if layer.numel <= MAX_DENSE:
        matrix = curvature.block(0, layer.numel)
        lam = relative_damping(matrix, job.damping)
        inverse, used, raised = damped_inverse(matrix, lam)
        _note_damping(job, layer, lam, used, raised)
        return GreedyOBS(weight[None], inverse[None], n_of_m=n_of_m)
    size = BLOCK_SIZE if n_of_m is None else math.ceil(BLOCK_SIZE / n_of_m[1]) * n_of_m[1]
    groups = math.ceil(layer.numel / size)
    device = weight.device
    blocks = torch.eye(size, dtype=torch.float64, device=device).repeat(groups, 1, 1)
    for group in range(groups):
        start, stop = group * size, min((group + 1) * size, layer.numel)
        blocks[group, : stop - start, : stop - start] = curvature.block(start, stop)
    padded = torch.zeros(groups * size, dtype=torch.float64, device=device)
    padded[: layer.numel] = weight
    blocked = torch.arange(groups * size, device=device) >= layer.numel
    diagonal = blocks.diagonal(dim1=1, dim2=2).reshape(-1)[: layer.numel]
    lam = job.damping * abs(float(diagonal.mean()))
    inverse, used, raised = damped_inverse(blocks, lam)
    _note_damping(job, layer, lam, used, raised)
    return GreedyOBS(padded.view(groups, size), inverse, blocked.view(groups, size), n_of_m)


def _note_damping(job: _Job, layer: Layer, lam: float, used: float, raised: bool) -> None:
    if raised:
        job.notes.append(
            f"damping of {layer.name} raised from {lam:.3g} to {used:.3g} "
            "(curvature block not positive definite)"
        )


def _obs_channels(job: _Job, engines: list[GreedyOBS], saliency: dict) -> Outcome:
    """Whole rows: ranked by the joint OBS saliency, removed at once with the joint update
    (dense layers); rows of block-diagonal layers by their summed saliency, without update."""
    rows = {}
    for layer, engine in zip(job.layers, engines, strict=True):
        if engine.w.shape[0] == 1:
            rows[layer.name] = row_saliency(engine.w[0], engine.hinv[0], layer.rows)
        else:
            rows[layer.name] = saliency[layer.name].sum(dim=1)
    kept = select_rows(rows, job.layers, job.sparsity, job.scope)
    masks = _row_masks(job, kept)
    new = {}
    for layer, engine in zip(job.layers, engines, strict=True):
        mask = masks[layer.name]
        if engine.w.shape[0] == 1:
            removed = torch.nonzero(~mask.reshape(-1)).reshape(-1)
            weight, applied = joint_removal(engine.w[0], engine.hinv[0], removed)
            if not applied:
                job.notes.append(f"rows of {layer.name} removed without update (singular)")
            new[layer.name] = weight.reshape(mask.shape)
        else:
            new[layer.name] = job.weights[layer.name] * mask
        job.tick(int((~mask).sum()))
    return new, masks, saliency


def _row_masks(job: _Job, kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    masks = rows_to_masks(kept, job.layers)
    return {name: mask.reshape(job.weights[name].shape) for name, mask in masks.items()}


def _layer_obs(job: _Job) -> Outcome:
    hessians = layerwise.input_hessians(job.model, job.data, job.layers)
    saliency, energy = {}, {}
    for layer in job.layers:
        weight, hessian = job.weights[layer.name], 2 * hessians[layer.name]
        inverse, _, _ = damped_inverse(hessian, relative_damping(hessian, job.damping))
        saliency[layer.name] = weight**2 / (2 * inverse.diagonal())
        energy[layer.name] = max(float((weight @ hessians[layer.name] * weight).sum()), 1e-300)
    if job.structure.kind == "channel":  # a whole row costs w_r H w_rᵀ; no row can compensate
        rows = {
            n: (job.weights[n] @ hessians[n] * job.weights[n]).sum(dim=1) / energy[n]
            for n in hessians
        }
        kept = select_rows(rows, job.layers, job.sparsity, job.scope)
        masks = _row_masks(job, kept)
        job.tick(sum(int((~m).sum()) for m in masks.values()))
        return {n: job.weights[n] * masks[n] for n in masks}, masks, saliency
    counts = job.removals()
    if job.scope == "global" and job.structure.kind is None:
        relative = {n: s / energy[n] for n, s in saliency.items()}
        chosen = select(relative, job.layers, job.sparsity, "global", job.structure)
        counts = [int((~chosen[layer.name]).sum()) for layer in job.layers]
    new, masks = {}, {}
    for layer, removals in zip(job.layers, counts, strict=True):
        weight, keep, lam, raised = layerwise.prune_layer(
            job.weights[layer.name], hessians[layer.name], removals, job.structure, job.damping
        )
        _note_damping(job, layer, job.damping, lam, raised)
        new[layer.name], masks[layer.name] = weight, keep
        job.tick(removals)
    return new, masks, saliency


_METHODS: dict[str, Callable[[_Job], Outcome]] = {
    "magnitude": _magnitude,
    "obd": _obd,
    "obs": _obs,
    "layer_obs": _layer_obs,
}


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
