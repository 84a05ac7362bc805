"""The pruning methods of :func:`curvscope.prune`: each takes a job (the weights as (rows,
cols) float64 matrices and the options) and returns new weights, masks and saliencies."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import layer_obs as layerwise
from ._validate import Layer, Structure
from .curvature import LayerCurvature, layer_curvatures
from .masks import count, rows_to_masks, select, select_rows
from .obs import (
    GreedyOBS,
    damped_inverse,
    joint_removal,
    relative_damping,
    row_saliency,
    run_greedy,
)

#: Layers with at most this many pruned weights get one dense curvature block (dense OBS);
#: larger ones a block-diagonal one with blocks of ``BLOCK_SIZE`` consecutive weights.
MAX_DENSE = 4096
BLOCK_SIZE = 256


@dataclass
class Job:
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
        return removals(self.layers, self.sparsity, self.structure)


def removals(layers: list[Layer], sparsity: float, structure: Structure) -> list[int]:
    """Weights removed per layer (scope "layer"; n:m removes exactly n of every m)."""
    if structure.kind == "n:m":
        return [layer.numel * structure.n // structure.m for layer in layers]
    return [count(sparsity, layer.numel) for layer in layers]


# -- the methods: each returns (new weights, masks, saliencies), all (rows, cols) ---------------
Outcome = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]


def _by_scores(job: Job, scores: dict[str, torch.Tensor]) -> Outcome:
    """Remove by ``scores`` without updating the other weights."""
    masks = select(scores, job.layers, job.sparsity, job.scope, job.structure)
    masks = {name: mask.reshape(job.weights[name].shape) for name, mask in masks.items()}
    job.tick(sum(int((~mask).sum()) for mask in masks.values()))
    new = {name: job.weights[name] * masks[name] for name in masks}
    return new, masks, scores


def _magnitude(job: Job) -> Outcome:
    return _by_scores(job, {name: w.abs() for name, w in job.weights.items()})


def _diagonals(job: Job) -> dict[str, torch.Tensor]:
    curvatures = layer_curvatures(
        job.curvature, job.model, job.loss_fn, job.data, job.layers, job.seed
    )
    return {
        layer.name: curvatures[layer.name].diagonal(job.seed).reshape(layer.rows, layer.cols)
        for layer in job.layers
    }


def _obd(job: Job) -> Outcome:
    diagonals = _diagonals(job)
    return _by_scores(job, {n: 0.5 * w**2 * diagonals[n] for n, w in job.weights.items()})


def _obs(job: Job) -> Outcome:
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


def _engine(job: Job, layer: Layer, curvature: LayerCurvature) -> GreedyOBS:
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


def _note_damping(job: Job, layer: Layer, lam: float, used: float, raised: bool) -> None:
    if raised:
        job.notes.append(
            f"damping of {layer.name} raised from {lam:.3g} to {used:.3g} "
            "(curvature block not positive definite)"
        )


def _obs_channels(job: Job, engines: list[GreedyOBS], saliency: dict) -> Outcome:
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


def _row_masks(job: Job, kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    masks = rows_to_masks(kept, job.layers)
    return {name: mask.reshape(job.weights[name].shape) for name, mask in masks.items()}


def _layer_obs(job: Job) -> Outcome:
    hessians = layerwise.input_hessians(job.model, job.data, job.layers)
    saliency, energy, inverses = {}, {}, {}
    for layer in job.layers:  # OBS on ‖W X − Ŵ X‖² = Σ_rows δwᵀ (2H / 2) δw: C = 2H
        weight, hessian = job.weights[layer.name], 2 * hessians[layer.name]
        lam = relative_damping(hessian, job.damping)
        if layerwise.sweeps(layer) and job.model.get_parameter(layer.name).dtype == torch.float32:
            hessian = hessian.float()  # large float32 layers: SparseGPT's precision, 2-4x faster
        inverse, used, raised = damped_inverse(hessian, lam)
        inverse = inverse.double()
        _note_damping(job, layer, lam, used, raised)
        inverses[layer.name] = inverse
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
        new[layer.name], masks[layer.name] = layerwise.prune_layer(
            job.weights[layer.name], inverses[layer.name], removals, job.structure
        )
        job.tick(removals)
    return new, masks, saliency


RUNNERS: dict[str, Callable[[Job], Outcome]] = {
    "magnitude": _magnitude,
    "obd": _obd,
    "obs": _obs,
    "layer_obs": _layer_obs,
}
