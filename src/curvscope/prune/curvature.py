"""The curvature that OBD and OBS use, per pruned layer, from the public operators.

"ggn", "fisher" (empirical) and "hessian" build the operator of the layer alone
(``params=[name]``) and read dense blocks from products with identity columns; "kfac" builds one
``curvscope.KFACOperator`` over all pruned layers and reads the same blocks from its cheap
Kronecker products and its exact ``diagonal()``; "diagonal" is the exact GGN diagonal of
``curvscope.GGNDiagonalOperator``.
Every curvature is of the mean loss, as the operators define it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from .. import operators
from ..estimators import diagonal as estimate_diagonal
from ._validate import Layer

#: Columns per product block when a dense block is read from an operator.
CHUNK = 32
#: Layers up to this size compute their dense block for the diagonal (OBS uses it later).
DENSE_LIMIT = 4096
#: Larger layers get a Monte Carlo (XDiag) GGN diagonal when no exact diagonal operator exists.
EXACT_DIAGONAL_LIMIT = 20_000
_PRODUCTS = {
    "ggn": operators.GGNOperator,
    "fisher": operators.FisherOperator,
    "hessian": operators.HessianOperator,
}


#: While :func:`reuse_curvature` is active: computed blocks, diagonals and input Hessians.
_CACHE: ContextVar[dict | None] = ContextVar("curvscope_prune_cache", default=None)


@contextlib.contextmanager
def reuse_curvature() -> Iterator[None]:
    """Within this context, prunings of the same model on the same data reuse the curvature
    blocks, diagonals and layer input Hessians already computed (``prune_sweep`` uses it).
    Nested contexts share the outermost cache."""
    outer = _CACHE.get()
    token = _CACHE.set({} if outer is None else outer)
    try:
        yield
    finally:
        _CACHE.reset(token)


def cached(key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()``, or its value from an earlier call with the same key in this context."""
    cache = _CACHE.get()
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


class LayerCurvature:
    """Dense blocks and the diagonal of the curvature of one pruned layer (indices are positions
    in the layer's flattened weight)."""

    def __init__(
        self, op: Any, offset: int, layer: Layer, key: tuple, diagonal: Callable | None = None
    ) -> None:
        self.op, self.offset, self.layer, self.key = op, offset, layer, key
        self._diagonal = diagonal

    def columns(self, start: int, stop: int) -> torch.Tensor:
        """C[:, start:stop] restricted to the layer: (numel, stop - start), in float64."""
        size = self.op.shape[0]
        pieces = []
        for first in range(start, stop, CHUNK):
            last = min(first + CHUNK, stop)
            basis = torch.zeros(size, last - first, dtype=self.op.dtype, device=self.op.device)
            rows = torch.arange(first, last, device=basis.device) + self.offset
            basis[rows, torch.arange(last - first, device=basis.device)] = 1.0
            product = self.op.matmat(basis)[self.offset : self.offset + self.layer.numel]
            pieces.append(product.to(torch.float64))
        return torch.cat(pieces, dim=1)

    def block(self, start: int, stop: int) -> torch.Tensor:
        """The dense diagonal block C[start:stop, start:stop] in float64."""
        key = (*self.key, "block", start, stop)
        return cached(key, lambda: self.columns(start, stop)[start:stop])

    def diagonal(self, seed: int) -> torch.Tensor:
        """diag(C) of the layer, flat (numel,), in float64."""
        cache = _CACHE.get() or {}
        dense = cache.get((*self.key, "block", 0, self.layer.numel))
        if dense is not None:
            return dense.diagonal().clone()
        return cached((*self.key, "diagonal", seed), lambda: self._compute_diagonal(seed))

    def _compute_diagonal(self, seed: int) -> torch.Tensor:
        if self._diagonal is not None:
            return self._diagonal().reshape(-1).to(torch.float64)
        numel = self.layer.numel
        if numel <= DENSE_LIMIT:  # the same products as the dense block: keep it for OBS
            return self.block(0, numel).diagonal().clone()
        if numel <= EXACT_DIAGONAL_LIMIT:  # e_iᵀ C e_i, in blocks of columns
            pieces = []
            for first in range(0, numel, CHUNK):
                last = min(first + CHUNK, numel)
                pieces.append(self.columns(first, last)[first:last].diagonal())
            return torch.cat(pieces)
        result = estimate_diagonal(self.op, method="xdiag", num_matvecs=200, seed=seed)
        return result.value[self.offset : self.offset + numel].to(torch.float64)


def layer_curvatures(
    kind: str, model: nn.Module, loss_fn: Any, data: Any, layers: list[Layer], seed: int
) -> dict[str, LayerCurvature]:
    """One :class:`LayerCurvature` per pruned layer for ``kind`` (see the module docstring)."""
    names = [layer.name for layer in layers]
    base = (id(model), id(data), "ggn" if kind == "diagonal" else kind)  # the same GGN blocks
    if kind == "kfac":
        op = operators.KFACOperator(model, loss_fn, data, params=names, fisher="ggn")
        offsets = _offsets(op.param_names, op.param_shapes)
        diagonals: dict[str, torch.Tensor] = {}

        def diagonal_of(name: str) -> Callable[[], torch.Tensor]:
            def read() -> torch.Tensor:
                if not diagonals:
                    diagonals.update(op.diagonal())
                return diagonals[name]

            return read

        return {
            layer.name: LayerCurvature(
                op, offsets[layer.name], layer, (*base, layer.name), diagonal_of(layer.name)
            )
            for layer in layers
        }
    out = {}
    for layer in layers:
        if kind == "diagonal":
            op = operators.GGNOperator(model, loss_fn, data, params=[layer.name])
            exact = _diagonal_operator(model, loss_fn, data, layer, seed)
            out[layer.name] = LayerCurvature(op, 0, layer, (*base, layer.name), exact)
        else:
            op = _PRODUCTS[kind](model, loss_fn, data, params=[layer.name])
            out[layer.name] = LayerCurvature(op, 0, layer, (*base, layer.name))
    return out


def _diagonal_operator(
    model: nn.Module, loss_fn: Any, data: Any, layer: Layer, seed: int
) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        op = operators.GGNDiagonalOperator(model, loss_fn, data, params=[layer.name], seed=seed)
        return op.diagonal()[layer.name]

    return read


def _offsets(names: list[str], shapes: dict[str, torch.Size]) -> dict[str, int]:
    out, start = {}, 0
    for name in names:
        out[name] = start
        start += math.prod(shapes[name])
    return out
