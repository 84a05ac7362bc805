"""The block-diagonal part of any operator, formed densely block by block, as an operator."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .._checks import check_int, type_error, value_error
from ._structured import StructuredOperator, check_damping, inverse_spectrum
from .base import DEFAULT_MAX_DENSE_ENTRIES, as_operator

#: Columns of a block formed per product call (bounds the memory of vmapped products).
CHUNK = 64


def _layer_blocks(names: list[str]) -> list[list[str]]:
    """Parameters grouped by the module that owns them (the name without its last part)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    return list(groups.values())


def _check_blocks(func: str, blocks: Any, names: list[str]) -> list[list[str]]:
    if isinstance(blocks, str):
        if blocks != "layer":
            raise value_error(
                func, "blocks", "'layer' or a list of lists of parameter names", blocks
            )
        return _layer_blocks(names)
    expected = f"'layer' or a list of lists of parameter names from {names}"
    if not isinstance(blocks, Sequence) or not all(
        isinstance(b, Sequence) and not isinstance(b, str) and all(isinstance(n, str) for n in b)
        for b in blocks
    ):
        raise type_error(func, "blocks", expected, blocks)
    flat = [name for block in blocks for name in block]
    unknown = sorted(set(flat) - set(names))
    repeated = sorted({name for name in flat if flat.count(name) > 1})
    missing = [name for name in names if name not in set(flat)]
    if unknown or repeated or missing or any(len(block) == 0 for block in blocks):
        raise value_error(
            func,
            "blocks",
            "non-empty blocks that together hold every parameter of the operator exactly once",
            blocks,
            f"Unknown: {unknown}; in several blocks: {repeated}; in no block: {missing}. "
            "Put every parameter in one block (a block of its own keeps its diagonal block).",
        )
    order = {name: i for i, name in enumerate(names)}
    return [sorted(block, key=order.__getitem__) for block in blocks]


class BlockDiagonalOperator(StructuredOperator):
    """``blockdiag(A_11, ..., A_bb)``: the chosen diagonal blocks of any operator ``A`` (P, P).

    Each block is formed densely once, by the operator's ``block(names)`` where it has one (the
    model operators: products over that block's parameters only), else by products with the
    identity columns of that block; then eigendecomposed, so that ``inverse``, ``logdet``,
    ``trace`` and ``diagonal`` are exact for the block-diagonal matrix (an indefinite block,
    e.g. of a Hessian, has an inverse when no eigenvalue is -damping, but no real logdet).

    Args:
        operator: any curvscope operator with ``param_names`` (or a DenseOperator).
        blocks: "layer" (the parameters of one module together) or a list of lists of
            parameter names holding every parameter exactly once.
        max_entries: refuse, naming the block, a block with more entries than this.

    Example:
        >>> import torch, curvscope
        >>> A = curvscope.DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]]).double())
        >>> round(curvscope.BlockDiagonalOperator(A).logdet(), 12)  # log(2·3 - 1)
        1.609437912434
    """

    def __init__(
        self,
        operator: Any,
        blocks: str | Sequence[Sequence[str]] = "layer",
        *,
        max_entries: int = DEFAULT_MAX_DENSE_ENTRIES,
    ) -> None:
        func = self._func = type(self).__name__
        operator = as_operator(operator, func, "operator")
        check_int(func, "max_entries", max_entries, minimum=1)
        shapes = getattr(operator, "param_shapes", None) or {
            "matrix": torch.Size([operator.shape[0]])
        }
        self._param_shapes = dict(shapes)
        self._dtype, self._device, self._num_matvecs = operator.dtype, operator.device, 0
        self._operator = operator
        names = list(self._param_shapes)
        self._blocks = _check_blocks(func, blocks, names)
        starts, start = {}, 0
        for name in names:
            starts[name] = start
            start += math.prod(self._param_shapes[name])
        self._indices = [
            torch.cat(
                [
                    torch.arange(starts[n], starts[n] + math.prod(self._param_shapes[n]))
                    for n in block
                ]
            ).to(self._device)
            for block in self._blocks
        ]
        for block, index in zip(self._blocks, self._indices, strict=True):
            size = index.numel()
            if size * size > max_entries:
                itemsize = torch.empty((), dtype=self.dtype).element_size()
                gib = size * size * itemsize / 2**30
                raise ValueError(
                    f"curvscope.{func}(blocks=...): the block {block} has {size} parameters, "
                    f"so its dense matrix has {size * size:,} entries ({gib:.2f} GiB in "
                    f"{self.dtype}), more than max_entries={max_entries:,}. Split it "
                    "into smaller blocks, or pass a larger max_entries if you have the memory."
                )
        self._dense: list[torch.Tensor] | None = None
        self._eigen: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def blocks(self) -> list[list[str]]:
        """The parameter names of each block, in the operator's order."""
        return [list(block) for block in self._blocks]

    def dense_blocks(self) -> list[torch.Tensor]:
        """The dense diagonal blocks, one (b, b) matrix per block."""
        if self._dense is None:
            self._dense = [
                self._form(block, index)
                for block, index in zip(self._blocks, self._indices, strict=True)
            ]
        return self._dense

    def _form(self, block: list[str], index: torch.Tensor) -> torch.Tensor:
        """The dense block, from products with its identity columns, ``CHUNK`` at a time."""
        op, size = self._operator, index.numel()
        sub = op.block(block) if hasattr(op, "block") and len(self._blocks) > 1 else None
        if sub is not None and list(getattr(sub, "param_names", [])) != block:
            sub = None
        columns = []
        for start in range(0, size, CHUNK):
            stop = min(start + CHUNK, size)
            rows = torch.arange(start, stop, device=self.device)
            if sub is not None:
                eye = torch.zeros(size, stop - start, dtype=self.dtype, device=self.device)
                eye[rows, rows - start] = 1
                columns.append(sub.matmat(eye))
            else:
                eye = torch.zeros(op.shape[0], stop - start, dtype=self.dtype, device=self.device)
                eye[index[rows], rows - start] = 1
                columns.append(op.matmat(eye)[index])
        dense = torch.cat(columns, dim=1)
        return (dense + dense.T) / 2

    def _eigh(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._eigen is None:
            self._eigen = [torch.linalg.eigh(block) for block in self.dense_blocks()]
        return self._eigen

    # -- the structured algebra ----------------------------------------------------------------
    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(matrix)
        for index, dense in zip(self._indices, self.dense_blocks(), strict=True):
            out[index] = dense @ matrix[index]
        return out

    def _inverse_matmat(self, matrix: torch.Tensor, damping: float) -> torch.Tensor:
        out = torch.empty_like(matrix)
        func = f"{self._func}.inverse"
        for index, (values, vectors) in zip(self._indices, self._eigh(), strict=True):
            scale = inverse_spectrum(func, values, damping).unsqueeze(1)
            out[index] = vectors @ (scale * (vectors.T @ matrix[index]))
        return out

    def _spectrum(self) -> torch.Tensor:
        return torch.cat([values for values, _ in self._eigh()])

    def _diagonal_flat(self) -> torch.Tensor:
        out = torch.empty(self.shape[0], dtype=self.dtype, device=self.device)
        for index, dense in zip(self._indices, self.dense_blocks(), strict=True):
            out[index] = torch.diagonal(dense)
        return out

    def trace(self) -> float:
        """``Σ_b tr A_bb``, exact."""
        return float(sum(torch.trace(dense) for dense in self.dense_blocks()))

    def logdet(self, damping: float = 0.0) -> float:
        """``log det(A_bd + λI)`` by a Cholesky factor per block (eigenvalues where it fails)."""
        func = f"{self._func}.logdet"
        damping = check_damping(func, damping)
        total = 0.0
        for dense in self.dense_blocks():
            eye = torch.eye(dense.shape[0], dtype=dense.dtype, device=dense.device)
            factor, info = torch.linalg.cholesky_ex(dense + damping * eye)
            if int(info) == 0:
                total += 2.0 * float(torch.log(torch.diagonal(factor)).sum())
            else:
                return super().logdet(damping)
        return total
