"""Layer-wise OBS: per Linear/Conv layer, keep W X ≈ Ŵ X on the calibration inputs X.

The layer's reconstruction error ‖W X − Ŵ X‖² = Σ_rows (w − ŵ)ᵀ H (w − ŵ) with H = X Xᵀ is a
quadratic in each output row with the same H, so OBS applies row by row (Optimal Brain
Compression, Frantar & Alistarh, NeurIPS 2022): small layers run the exact greedy OBS over all
rows at once (the engine of ``obs.py`` with one group per row); large layers use SparseGPT's
column sweep (Frantar & Alistarh, ICML 2023): columns are visited left to right, the mask is
chosen per block of columns from w² / [H⁻¹]_cc², and the error of each pruned column is spread
over the columns to its right through the Cholesky factor of H⁻¹. The inputs X are captured with
forward hooks on a deep copy of the model (the model itself is never touched).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..operators.data import iterate_batches, model_arguments
from ._validate import FUNC, Layer, Structure
from .curvature import cached
from .obs import GreedyOBS

#: The exact greedy per-row OBS runs where rows · cols² and the weight count are at most these.
OBC_MAX_ENTRIES = 2**22
OBC_MAX_WEIGHTS = 5_000
#: Columns per block of the SparseGPT sweep.
SWEEP_BLOCK = 128


def input_hessians(model: nn.Module, data: Any, layers: list[Layer]) -> dict[str, torch.Tensor]:
    """H = X Xᵀ (cols, cols) per layer, summed over every example and position: each batch's
    product in the model's dtype, the sum over batches in float64."""
    key = (id(model), id(data), "inputs", tuple(layer.name for layer in layers))
    return cached(key, lambda: _capture(model, data, layers))


def _capture(model: nn.Module, data: Any, layers: list[Layer]) -> dict[str, torch.Tensor]:
    replica = copy.deepcopy(model).eval()
    modules = dict(replica.named_modules())
    device = next(replica.parameters()).device
    hessians: dict[str, torch.Tensor] = {}
    handles = []
    for layer in layers:
        module = modules[layer.name.rpartition(".")[0]]
        hessians[layer.name] = torch.zeros(
            layer.cols, layer.cols, dtype=torch.float64, device=device
        )

        def hook(module: nn.Module, inputs: tuple, output: Any, name: str = layer.name) -> None:
            patches = _patches(module, inputs[0])  # X Xᵀ of a batch in the model's dtype
            hessians[name] += (patches.T @ patches).to(torch.float64)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in iterate_batches(data, device=device, max_batch_size=None, func=FUNC):
                args, kwargs = model_arguments(batch.inputs)
                replica(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as rows (T, cols) in the order of ``weight.reshape(out, -1)``."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    if isinstance(module, nn.Conv1d):
        x = x if x.ndim == 3 else x.unsqueeze(0)
        x, kernel = x.unsqueeze(2), (1, *module.kernel_size)
        dilation, stride = (1, *module.dilation), (1, *module.stride)
        padding = module.padding if isinstance(module.padding, str) else (0, *module.padding)
    else:
        x = x if x.ndim == 4 else x.unsqueeze(0)
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        padding = module.padding
    if isinstance(padding, str):  # "valid" or "same" (maybe asymmetric): pad explicitly
        pads: list[int] = []
        for size, dil in zip(reversed(kernel), reversed(dilation), strict=True):
            total = 0 if padding == "valid" else dil * (size - 1)
            pads += [total // 2, total - total // 2]
        x, padding = F.pad(x, pads), 0
    unfolded = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return unfolded.transpose(1, 2).reshape(-1, unfolded.shape[1])


def saliency(weight: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """w² / [H⁻¹]_cc for a weight (rows, cols): the error of removing each weight alone."""
    return weight**2 / inverse.diagonal()


def sweeps(layer: Layer) -> bool:
    """Whether the layer is pruned by the column sweep (too large for the exact greedy)."""
    return not (layer.rows * layer.cols**2 <= OBC_MAX_ENTRIES and layer.numel <= OBC_MAX_WEIGHTS)


def prune_layer(
    weight: torch.Tensor, inverse: torch.Tensor, removals: int, structure: Structure
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one layer's weight (rows, cols) in float64 given (2H + λI)⁻¹ (cols, cols);
    returns (new weight, mask). ``structure`` None or "n:m" (rows are independent)."""
    rows, cols = weight.shape
    n_of_m = (structure.n, structure.m) if structure.kind == "n:m" else None
    if rows * cols * cols <= OBC_MAX_ENTRIES and rows * cols <= OBC_MAX_WEIGHTS:
        engine = GreedyOBS(weight, inverse.expand(rows, cols, cols), n_of_m=n_of_m)
        left = rows * cols * structure.n // structure.m if n_of_m else removals
        while left > 0:
            done = engine.remove(left)
            if done == 0:
                break
            left -= done
        return engine.w, ~engine.removed
    return sweep(weight, inverse, removals, n_of_m)


def sweep(
    weight: torch.Tensor,
    inverse: torch.Tensor,
    removals: int,
    n_of_m: tuple[int, int] | None,
    block: int = SWEEP_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's column sweep with the upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U).

    Unstructured: each block of columns removes its share of ``removals`` (so that the layer
    removes exactly ``removals``), the weights of lowest w² / U_cc² at the block's start.
    """
    cols = weight.shape[1]
    upper = torch.linalg.cholesky(inverse, upper=True)
    w = weight.clone()
    keep = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        part, factor = w[:, start:stop].clone(), upper[start:stop, start:stop]
        errors = torch.zeros_like(part)
        local = torch.ones_like(part, dtype=torch.bool)
        if n_of_m is None:
            k = _share(removals, stop, cols) - _share(removals, start, cols)
            score = (part**2 / factor.diagonal() ** 2).reshape(-1)
            local.view(-1)[torch.argsort(score, stable=True)[:k]] = False
        for i in range(stop - start):
            if n_of_m is not None and i % n_of_m[1] == 0:
                width = n_of_m[1]
                score = part[:, i : i + width] ** 2 / factor.diagonal()[i : i + width] ** 2
                lowest = torch.argsort(score, dim=1, stable=True)[:, : n_of_m[0]]
                local[:, i : i + width].scatter_(1, lowest, False)
            column = part[:, i]
            target = torch.where(local[:, i], column, torch.zeros_like(column))
            error = (column - target) / factor[i, i]
            part[:, i:] -= error[:, None] * factor[i, i:][None, :]
            part[:, i] = target
            errors[:, i] = error
        w[:, start:stop], keep[:, start:stop] = part, local
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    return w, keep


def _share(removals: int, column: int, cols: int) -> int:
    """round(removals · column / cols), in integers: the removals due before ``column``."""
    return (2 * removals * column + cols) // (2 * cols)
