"""Masks from scores: the k lowest per layer or overall, n of every m, or whole output rows.

A mask is True where a weight is kept. Ties are broken by position (stable sorts), so the same
scores always give the same mask.
"""

from __future__ import annotations

import math

import torch

from ._validate import Layer, Structure


def count(sparsity: float, size: int) -> int:
    """How many of ``size`` weights a sparsity removes: round half up, so within one weight."""
    return min(size, math.floor(sparsity * size + 0.5))


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask (True = kept) removing the k lowest entries of a flat tensor."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.argsort(scores, stable=True)[:k]] = False
    return keep


def n_of_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Remove the n lowest of every m consecutive entries along the last dimension."""
    blocks = scores.reshape(-1, m)
    order = torch.argsort(blocks, dim=1, stable=True)[:, :n]
    keep = torch.ones_like(blocks, dtype=torch.bool)
    keep.scatter_(1, order, False)
    return keep.reshape(scores.shape)


def select(
    scores: dict[str, torch.Tensor],
    layers: list[Layer],
    sparsity: float,
    scope: str,
    structure: Structure,
) -> dict[str, torch.Tensor]:
    """Masks shaped like the parameters from per-weight ``scores`` (lower = removed first).

    For "channel", a row's score is the sum of its weights' scores (pass squared magnitudes for
    an L2 criterion) and whole rows are removed: per layer round(sparsity · rows), or, with
    scope "global", rows in increasing score until round(sparsity · all weights) are zero.
    """
    if structure.kind == "n:m":
        return {
            layer.name: n_of_m_mask(
                scores[layer.name].reshape(-1), structure.n, structure.m
            ).reshape(layer.shape)
            for layer in layers
        }
    if structure.kind == "channel":
        rows = {
            layer.name: scores[layer.name].reshape(layer.rows, -1).sum(dim=1) for layer in layers
        }
        return rows_to_masks(select_rows(rows, layers, sparsity, scope), layers)
    if scope == "layer":
        return {
            layer.name: _lowest(
                scores[layer.name].reshape(-1), count(sparsity, layer.numel)
            ).reshape(layer.shape)
            for layer in layers
        }
    flat = torch.cat([scores[layer.name].reshape(-1) for layer in layers])
    keep = _lowest(flat, count(sparsity, flat.numel()))
    sizes = [layer.numel for layer in layers]
    return {
        layer.name: piece.reshape(layer.shape)
        for layer, piece in zip(layers, keep.split(sizes), strict=True)
    }


def select_rows(
    row_scores: dict[str, torch.Tensor], layers: list[Layer], sparsity: float, scope: str
) -> dict[str, torch.Tensor]:
    """Per layer a bool (rows,) tensor, True = the row is kept."""
    if scope == "layer":
        return {
            layer.name: _lowest(row_scores[layer.name], count(sparsity, layer.rows))
            for layer in layers
        }
    flat = torch.cat([row_scores[layer.name] for layer in layers])
    widths = torch.cat(
        [torch.full((layer.rows,), layer.cols, dtype=torch.long) for layer in layers]
    ).to(flat.device)
    target = count(sparsity, sum(layer.numel for layer in layers))
    order = torch.argsort(flat, stable=True)
    zeros = torch.cumsum(widths[order], dim=0).cpu()
    taken = int(torch.searchsorted(zeros, torch.tensor(target), side="left")) + 1 if target else 0
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[order[: min(taken, flat.numel())]] = False
    return dict(zip(row_scores, keep.split([layer.rows for layer in layers]), strict=True))


def rows_to_masks(rows: dict[str, torch.Tensor], layers: list[Layer]) -> dict[str, torch.Tensor]:
    """Expand per-row decisions to masks shaped like the parameters."""
    return {
        layer.name: rows[layer.name][:, None].expand(layer.rows, layer.cols).reshape(layer.shape)
        for layer in layers
    }
